"""`llm grpo`: short runs on the tiny fixtures (gold checker, reward model, a user function; full and LoRA),
the artifact, exact resume after SIGTERM, the rewards, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.config import GRPOConfig, build_config
from tests.test_sft import BASE_PARAMS, LORA_PARAMS, assert_usage_error, manifest, run_cli

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = dict(max_steps=2, world_prompts=16, eval_prompts=8, num_generations=4, prompts_per_step=2, batch_size=8,
             max_new_tokens=4, warmup_steps=0, save_every=0, log_every=1, eval_every=100, lr=1e-2)


def grpo_cfg(policy, out, **kw):
    values = dict(base=str(policy), out=str(out), **SMALL)
    values.update(kw)
    return build_config(GRPOConfig, None, values)


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory, tiny_base):
    """A reward-model artifact: the tiny base with an untrained one-output head."""
    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import REWARD_HEAD, load_for_training
    from lifecycle.tokenizer import load_tokenizer

    class Full:
        lora = qlora = dora = False

    tok = load_tokenizer(str(tiny_base))
    rm = load_for_training(str(tiny_base), Full(), head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("grpo_rm")
    save_model_artifact(rm, tok, out, stage="reward", config={}, metrics={"eval_accuracy": 0.5}, parent=None, seed=0)
    return out


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_base, tiny_reward):
    from lifecycle.stages import grpo

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"grpo_{name}")
            kw = {"gold": dict(reward_fn="gold"), "rm": dict(reward=str(tiny_reward)),
                  "lora": dict(reward=str(tiny_reward), lora=True)}[name]
            cache[name] = grpo.run(grpo_cfg(tiny_base, out, **kw))
        return cache[name]

    return get


def test_full_grpo_with_a_reward_model_writes_a_stock_causal_lm(grpo_run, tiny_base, tiny_reward):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = grpo_run("rm")
    m = manifest(out)
    assert m["stage"] == "grpo" and m["kind"] == "causal-lm" and m["mode"] == "full"
    assert m["parent"]["path"] == str(Path(tiny_base).resolve()) and m["parent"]["digest"]
    assert m["reward"]["path"] == str(Path(tiny_reward).resolve()) and m["reward"]["digest"]
    mt = m["metrics"]
    assert mt["steps"] == 2 and mt["trainable_params"] == mt["total_params"] == BASE_PARAMS
    for key in ("score_initial", "score", "kl", "gold_accuracy", "gold_accuracy_initial", "zero_variance_groups"):
        assert isinstance(mt[key], float) and math.isfinite(mt[key]), key
    assert mt["kl"] > 0  # two steps at lr 1e-2 move the policy off the reference
    before, after = load_file(Path(tiny_base) / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    AutoModelForCausalLM.from_pretrained(out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "eval_score" in log[0]
    assert any("loss" in r and "reward" in r and "frac_reward_zero_std" in r for r in log)


def test_gold_reward_groups_of_an_untrained_model_have_zero_variance(grpo_run):
    """The untrained tiny model never answers right: every reward is 0, every group has zero variance."""
    m = manifest(grpo_run("gold"))
    assert m["reward"] == {"function": "gold"}
    assert m["metrics"]["zero_variance_groups"] == 1.0 and m["metrics"]["score"] == 0.0
    assert "zero_variance" in m["metrics"]["watchdog_alarms"]


def test_lora_grpo_trains_only_the_adapter_and_loads_in_stock_peft(grpo_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = grpo_run("lora")
    m = manifest(out)
    assert m["mode"] == "lora" and m["metrics"]["trainable_params"] == LORA_PARAMS
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "adapter")
    assert m["metrics"]["kl"] > 0  # measured against the adapter disabled


def test_gold_reward_is_one_exactly_for_the_sum_ended_by_a_stop_id():
    from lifecycle.stages.grpo import gold_reward

    fn = gold_reward([7])
    p = [{"role": "user", "content": "what is 48 plus 87 ?"}]
    c = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    assert fn([p, p, p, p], [c("135"), c(" 135 "), c("135"), c("125")], [[1, 7], [1, 7], [1, 2], [1, 7]]) == [
        1.0, 1.0, 0.0, 0.0]  # the third never ended; the fourth is wrong


def test_a_user_reward_function_is_called_and_checked(tmp_path, monkeypatch):
    from lifecycle.errors import UsageError
    from lifecycle.stages.grpo import CheckedReward, user_reward

    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c[-1]['content'])) for c in completions]\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    c = [[{"role": "assistant", "content": t}] for t in ("1", "22", "333")]
    fn = CheckedReward(user_reward("my_rewards:length"), "my_rewards:length")
    assert fn(["p"] * 3, c, [[1], [1, 2], [1, 2, 2]]) == [1.0, 2.0, 3.0]
    assert fn.distinct_2 == pytest.approx(2 / 3)  # bigrams (1,2), (1,2), (2,2): two distinct of three
    with pytest.raises(UsageError, match="returned 1 values for 3 completions"):
        CheckedReward(user_reward("my_rewards:short"), "my_rewards:short")(["p"] * 3, c, [[1]] * 3)
    with pytest.raises(UsageError, match="has no function 'nope'"):
        user_reward("my_rewards:nope")
    with pytest.raises(UsageError, match="no module 'no_such_module'"):
        user_reward("no_such_module:f")


def test_sigterm_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from lifecycle.stages import grpo

    out = tmp_path / "term"
    # a constant learning rate: the interrupted run's schedule spans 1000 steps, the comparison's k + 1
    small = {**SMALL, "eval_every": 1000, "lr_scheduler": "constant", "reward_fn": "my_rewards:length"}
    small.pop("max_steps")
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c[-1]['content'])) for c in completions]\n")
    cmd = [sys.executable, "-m", "lifecycle", "grpo", "--policy", str(tiny_base), "--out", str(out), "--max-steps", "1000"]
    for k, v in small.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)})
    deadline, buf = time.time() + 120, ""
    while time.time() < deadline and p.poll() is None:
        line = p.stdout.readline()
        buf += line
        if line.startswith("step") and "reward" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, buf[-2000:] + err[-2000:]
    assert "Traceback" not in err and "checkpoint saved" in err
    assert not (out / "lifecycle.json").exists()
    cks = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert cks and (cks[-1] / "grpo_state.json").is_file()
    k = int(cks[-1].name.split("-")[1])
    monkey_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        opts = dict(base=str(tiny_base), max_steps=k + 1, **small)
        grpo.run(build_config(GRPOConfig, None, {**opts, "out": str(out), "resume": True}))
        grpo.run(build_config(GRPOConfig, None, {**opts, "out": str(tmp_path / "straight")}))
    finally:
        os.chdir(monkey_cwd)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)


def test_stop_on_collapse_saves_and_stops_at_a_watchdog_alarm_but_not_at_zero_variance(tiny_base, tmp_path, monkeypatch):
    """stop_on_collapse: the first watchdog alarm (here a stand-in at step 2) saves a checkpoint at that step and
    stops with Interrupted; the zero-variance notice, which the gold reward raises from step 1 on an untrained
    model, does not stop the run."""
    from lifecycle import watchdog
    from lifecycle.errors import Interrupted
    from lifecycle.stages import grpo

    real = watchdog.Watchdog.observe_step

    def observe_step(self, step, m):  # the untrained model never ends a response: its eos_rate alarm is dropped
        found = [a for a in real(self, step, m) if a["alarm"] != "eos_rate"]
        return found + ([{"step": step, "alarm": "length_drift", "message": "stand-in"}] if step == 2 else [])

    monkeypatch.setattr(watchdog.Watchdog, "observe_step", observe_step)
    out = tmp_path / "stopped"
    with pytest.raises(Interrupted, match=r"watchdog \(length_drift\) at step 2: checkpoint saved to .*checkpoint-2"):
        grpo.run(grpo_cfg(tiny_base, out, reward_fn="gold", max_steps=4, stop_on_collapse=True))
    assert (out / "checkpoints" / "checkpoint-2" / grpo.STATE_FILE).is_file()
    assert not (out / "lifecycle.json").exists()
    log = (out / "checkpoints" / "checkpoint-2" / grpo.STATE_FILE).read_text()
    assert "zero_variance" in log  # the notice was raised, and the run went on past it
    # --resume (stop_on_collapse may change on resume) finishes the run from step 2
    grpo.run(grpo_cfg(tiny_base, out, reward_fn="gold", max_steps=4, resume=True))
    m = json.loads((out / "lifecycle.json").read_text())
    assert m["config"]["stop_on_collapse"] is False and (out / "model.safetensors").is_file()


def test_cli_grpo_refuses_a_reward_model_as_policy(tiny_reward, tmp_path):
    p = run_cli("grpo", "--policy", str(tiny_reward), "--out", str(tmp_path / "o"), "--reward-fn", "gold")
    assert_usage_error(p, "--policy", "is a reward model", "--reward")


def test_cli_grpo_refuses_a_missing_reward_function(tiny_base, tmp_path):
    p = run_cli("grpo", "--policy", str(tiny_base), "--out", str(tmp_path / "o"), "--reward-fn", "no_such_mod:f")
    assert_usage_error(p, "--reward-fn no_such_mod:f", "no module")


def test_cli_grpo_refuses_a_reward_function_of_the_wrong_shape(tiny_base, tmp_path):
    (tmp_path / "bad_rewards.py").write_text("def one(prompts, completions, **kw):\n    return 1.0\n")
    cmd = [sys.executable, "-m", "lifecycle", "grpo", "--policy", str(tiny_base), "--out", str(tmp_path / "o"),
           "--reward-fn", "bad_rewards:one"]
    for k, v in SMALL.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)})
    assert_usage_error(p, "reward function bad_rewards:one returned a float", "one float (or None) per completion")


def test_cli_grpo_needs_exactly_one_reward_and_consistent_batches(tiny_base, tmp_path):
    p = run_cli("grpo", "--policy", str(tiny_base), "--out", str(tmp_path / "o"), "--num-generations", "6")
    assert_usage_error(p, "--reward or --reward-fn is required", "make them equal")


def test_default_recipe_restates_the_builtin_defaults():
    from lifecycle.config import read_yaml

    recipe = read_yaml(REPO / "recipes" / "default" / "grpo.yaml")
    defaults = GRPOConfig()
    for k, v in recipe.items():
        assert getattr(defaults, k) == v, k


def test_run_recipe_align_puts_grpo_in_the_alignment_slot():
    from lifecycle.runner import load_recipe

    from lifecycle.config import GRPOConfig, build_config

    plan = load_recipe(str(REPO / "recipes" / "default" / "run-grpo.yaml"))
    assert [s for s, _, _ in plan] == ["pretrain", "sft", "grpo"]
    assert plan[-1][1] == str(REPO / "recipes" / "default" / "grpo-gold.yaml")
    cfg = build_config(GRPOConfig, plan[-1][1], {"out": "x", "base": "p"})
    assert cfg.reward_fn == "gold" and cfg.validate() == []


def test_grpo_and_dpo_run_on_a_hub_style_family_with_its_own_stop_tokens(family_dir, tmp_path):
    """A ChatML model ends its turn with <|im_end|>, not EOS: GRPO's groups stop there, the artifact lists it."""
    from lifecycle.config import DPOConfig
    from lifecycle.stages import dpo, grpo

    d = family_dir("qwen3")
    out = grpo.run(grpo_cfg(d, tmp_path / "grpo", reward_fn="gold", lora=True, max_length=128))
    m = manifest(out)
    assert m["stage"] == "grpo" and m["metrics"]["steps"] == 2
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(stops, list) and len(stops) >= 2  # <|endoftext|> and <|im_end|>
    out = dpo.run(build_config(DPOConfig, None, dict(base=str(d), out=str(tmp_path / "dpo"), max_steps=2, world_prompts=8,
                                                     world_samples=2, eval_problems=4, kl_samples=4, batch_size=4,
                                                     warmup_steps=0, save_every=0, max_length=128)))
    assert manifest(out)["stage"] == "dpo"
