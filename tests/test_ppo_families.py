"""`llm ppo` on tiny random models of today's families (hub-style directories, ChatML template, hub
generation settings): full fine-tuning, and --lora with all four roles on the policy's one base.

Each case runs two PPO iterations and checks that the artifact is written, that stock transformers
loads the actor and the critic, that the trained weights moved, and that responses were cut at the
template's end-of-turn token (the stop ids are recorded in the actor's generation_config).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from families import EOT, IM_END
from lifecycle import artifacts
from lifecycle.config import PPOConfig, build_config
from lifecycle.modeling import REWARD_HEAD, load_for_training, merge_adapter
from lifecycle.stages import ppo
from lifecycle.tokenizer import load_tokenizer

FAMILIES = ["llama", "qwen3", "gemma2", "phi3", "mixtral"]
TINY = dict(prompts_per_rollout=4, minibatch_size=4, micro_batch_size=2, ppo_epochs=1, max_new_tokens=4,
            eval_prompts=4, gate_samples=4, world_prompts=16, max_steps=2, eval_every=2, save_every=0,
            log_every=100, lr=1e-2, critic_lr=1e-2)


def _reward_artifact(policy: Path, out: Path) -> Path:
    """A one-label classifier on the policy's own backbone (random head), as `llm reward` writes it."""
    tok = load_tokenizer(str(policy))
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    parent = artifacts.parent_record(artifacts.check_artifact(str(policy), artifacts.CAUSAL_LM, "--base"))
    artifacts.save_model_artifact(model, tok, out, stage="reward", config={}, metrics={"eval_accuracy": 0.9},
                                  parent=parent, seed=0)
    return out


def _lora_reward_artifact(policy: Path, out: Path, scratch: Path) -> Path:
    """`llm reward --lora` over the policy: the merged classifier plus OUT/adapter, parent digest = the policy's."""
    tok = load_tokenizer(str(policy))
    torch.manual_seed(3)
    model = load_for_training(str(policy), PPOConfig(lora=True), head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "score" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(scratch)
    merged = merge_adapter(str(policy), str(scratch), head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
    parent = artifacts.parent_record(artifacts.check_artifact(str(policy), artifacts.CAUSAL_LM, "--base"))
    artifacts.save_model_artifact(merged, tok, out, stage="reward", config={}, metrics={"eval_accuracy": 0.9},
                                  parent=parent, seed=0,
                                  extra_dirs={"adapter": lambda d: shutil.copytree(scratch, d, dirs_exist_ok=True)})
    return out


def _changed(before: Path, after: Path) -> bool:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-shared-base"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_runs_on_every_family(family, lora, family_dir, tmp_path):
    policy = family_dir(family)
    if lora:
        reward = _lora_reward_artifact(policy, tmp_path / "reward", tmp_path / "scratch")
    else:
        reward = _reward_artifact(policy, tmp_path / "reward")
    out = tmp_path / "ppo"
    ppo.run(build_config(PPOConfig, None, dict(policy=str(policy), reward=str(reward), out=str(out), lora=lora, **TINY)))

    m = json.loads((out / "lifecycle.json").read_text())
    assert m["stage"] == "ppo" and m["shared_base"] is lora
    assert m["metrics"]["iterations"] == 2 and isinstance(m["metrics"]["score"], float)
    actor = AutoModelForCausalLM.from_pretrained(out)
    assert actor.config.model_type == json.loads((policy / "config.json").read_text())["model_type"]
    assert not any("lora" in n for n in actor.state_dict())
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic").config.num_labels == 1
    assert _changed(policy, out)  # the actor trained
    tok = load_tokenizer(str(out))
    stops = actor.generation_config.eos_token_id
    assert set(stops) == {tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)}
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"score_mean"' in line]
    assert [d["step"] for d in steps] == [1, 2] and steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-shared-base"])
def test_memory_controls_and_kl_in_loss_on_a_hub_family(lora, family_dir, tmp_path):
    """Gradient checkpointing, a chunked rollout, a cosine schedule with warmup and KL as a loss term together, on
    qwen3 with hub generation settings: the run completes, starts at KL 0, and the optimizer saw the schedule."""
    policy = family_dir("qwen3")
    reward = (_lora_reward_artifact(policy, tmp_path / "reward", tmp_path / "scratch") if lora
              else _reward_artifact(policy, tmp_path / "reward"))
    out = tmp_path / "ppo"
    ppo.run(build_config(PPOConfig, None, dict(
        policy=str(policy), reward=str(reward), out=str(out), lora=lora, gradient_checkpointing=True,
        rollout_micro_batch_size=3, lr_scheduler="cosine", warmup_steps=1, kl_in_loss=True, kl_estimator="k3",
        **{**TINY, "max_steps": 3, "eval_every": 3})))
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"score_mean"' in line]
    assert [d["step"] for d in steps] == [1, 2, 3]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5) and steps[0]["kl_loss"] == pytest.approx(0.0, abs=1e-5)
    assert steps[1]["kl_loss"] > 0  # the actor moved off the reference and the loss term sees it
    # warmup: (0+1)/1; then (1 + cos(π p))/2 with p = (i - 1)/(3 - 1): 1 at i = 1, 0.5 at i = 2
    assert [d["lr"] for d in steps] == pytest.approx([1e-2, 1e-2, 5e-3])
    assert _changed(policy, out)
