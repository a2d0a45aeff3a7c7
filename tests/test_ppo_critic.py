"""The critic reads the normalised reward scale (issue: a critic started from the reward model predicted raw
scores while the returns it must predict are normalised, (s - mu0) / sigma0, which biased the advantages of the
last tokens by -lambda^(L-1-t) * c for an offset c). Its output goes through the same map as the scores, as
OpenRLHF's critic applies the reward normalisation; the saved critic keeps its raw head."""

from __future__ import annotations

import pytest

from lifecycle.config import PPOConfig, build_config

SMALL = dict(prompts_per_rollout=8, minibatch_size=8, micro_batch_size=8, max_new_tokens=4, eval_prompts=8,
             gate_samples=8, world_prompts=64, save_every=0, log_every=100)


@pytest.fixture(scope="module")
def rewards(tmp_path_factory, tiny_base):
    """A separate reward model (full) and one trained as a LoRA adapter on the policy's base (shared-base roles)."""
    import shutil

    import torch

    from lifecycle import artifacts
    from lifecycle.modeling import REWARD_HEAD, load_for_training, merge_adapter
    from lifecycle.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    parent = artifacts.parent_record(artifacts.check_artifact(str(tiny_base), artifacts.CAUSAL_LM, "--base"))
    made = {}
    for lora in (False, True):
        torch.manual_seed(3)
        model = load_for_training(str(tiny_base), PPOConfig(lora=lora), head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
        with torch.no_grad():  # a head far from zero, so the raw values sit far from the normalised ones
            for n, p in model.named_parameters():
                if "lora_B" in n or "score" in n:
                    p.normal_(0, 0.5)
        out = tmp_path_factory.mktemp(f"critic_rm_{lora}")
        extra = {}
        if lora:
            scratch = tmp_path_factory.mktemp("critic_rm_adapter")
            model.save_pretrained(scratch)
            model = merge_adapter(str(tiny_base), str(scratch), head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
            extra = {"adapter": lambda d, s=scratch: shutil.copytree(s, d, dirs_exist_ok=True)}
        artifacts.save_model_artifact(model, tok, out, stage="reward", config={}, metrics={"eval_accuracy": 0.9},
                                      parent=parent, seed=0, extra_dirs=extra)
        made[lora] = out
    return made


@pytest.mark.parametrize("lora", [False, True], ids=["separate-critic", "shared-base"])
def test_values_go_through_the_score_normalisation(lora, rewards, tiny_base, tmp_path):
    """After set_value_scale(mu, sigma), every value pass (rollout and training forward) returns (raw - mu) / sigma."""
    import torch
    from accelerate import Accelerator

    from lifecycle.generate import Sample
    from lifecycle.roles import SharedRoles, load_roles
    from lifecycle.stages import ppo

    cfg = build_config(PPOConfig, None, dict(policy=str(tiny_base), reward=str(rewards[lora]), out=str(tmp_path / "o"),
                                             lora=lora, **SMALL))
    inputs = ppo.check_inputs(cfg)
    roles = load_roles(cfg, inputs.policy, inputs.reward, inputs.critic, print)
    assert isinstance(roles, SharedRoles) == lora
    acc = Accelerator(cpu=True)
    roles.prepare(acc, ppo.make_optimizer(roles, cfg))
    for m in roles.trained:
        m.eval()
    ids = roles.tok("1 plus 2 is 3", add_special_tokens=False)["input_ids"]
    r = roles.to_rollout(["what is 1 plus 2 ?", "what is 4 plus 4 ?"], [Sample("p", "x", True, ids), Sample("p", "x", False, ids[:3])], "cpu")
    with torch.no_grad():
        raw, (_, raw_t) = roles.values(r), roles.train_forward(r)
        roles.set_value_scale(2.5, 4.0)
        norm, (_, norm_t) = roles.values(r), roles.train_forward(r)
    assert raw.abs().max() > 0.1  # the check means something: the raw values are not all zero
    m = r.response_mask.bool()
    assert torch.allclose(norm[m], (raw[m] - 2.5) / 4.0, atol=1e-5)
    assert torch.allclose(norm_t[m], (raw_t[m] - 2.5) / 4.0, atol=1e-5)


def test_the_first_rollouts_values_move_to_the_normalised_scale(rewards, tiny_base, tmp_path):
    """The first rollout fixes the normalisation only after its values were computed on the raw scale: the loop
    maps them with the same (v - mu) / sigma before GAE reads them, and the run records the mu and sigma it used."""
    import json

    import torch

    from lifecycle.stages import ppo

    out = tmp_path / "run"
    seen = {}
    real_rollout, real_adv = ppo.rollout, ppo.advantages

    def rollout(*a, **k):
        res = real_rollout(*a, **k)
        seen.setdefault("raw", res[0].values.clone())
        return res

    def advantages(r, score, beta, cfg):
        seen.setdefault("used", r.values.clone())
        seen.setdefault("mask", r.response_mask.clone())
        return real_adv(r, score, beta, cfg)

    ppo.rollout, ppo.advantages = rollout, advantages
    try:
        ppo.run(build_config(PPOConfig, None, dict(policy=str(tiny_base), reward=str(rewards[False]), out=str(out),
                                                   max_steps=1, **SMALL)))
    finally:
        ppo.rollout, ppo.advantages = real_rollout, real_adv
    norm = json.loads((out / "lifecycle.json").read_text())["metrics"]["reward_norm"]
    assert abs(norm["std"] - 1.0) > 0.05 and abs(norm["mean"]) > 0.05  # a map that is not the identity
    m = seen["mask"].bool()
    assert torch.allclose(seen["used"][m], (seen["raw"][m] - norm["mean"]) / norm["std"], atol=1e-5)
