"""`llm dpo`: short runs on the tiny fixtures (full and LoRA), the artifact, exact resume after SIGTERM, bad input."""

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

from lifecycle.config import DPOConfig, build_config
from tests.test_sft import BASE_PARAMS, LORA_PARAMS, assert_usage_error, manifest, run_cli

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def dpo_cfg(base, out, **kw):
    values = dict(base=str(base), out=str(out), max_steps=2, world_prompts=16, world_samples=2, eval_problems=8,
                  kl_samples=8, batch_size=8, eval_batch_size=16, warmup_steps=0, save_every=0, log_every=1,
                  eval_every=100, lr=1e-2)
    values.update(kw)
    return build_config(DPOConfig, None, values)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_base):
    """One short run per mode, shared by the tests below."""
    from lifecycle.stages import dpo

    cache: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"dpo_{mode}")
            cache[mode] = dpo.run(dpo_cfg(tiny_base, out, **({} if mode == "full" else {mode: True})))
        return cache[mode]

    return get


def test_full_dpo_writes_a_stock_causal_lm_with_its_metrics(dpo_run, tiny_base):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = dpo_run("full")
    m = manifest(out)
    assert m["stage"] == "dpo" and m["kind"] == "causal-lm" and m["mode"] == "full"
    assert m["parent"]["path"] == str(Path(tiny_base).resolve()) and m["parent"]["digest"]
    assert m["config"]["beta"] == 0.1 and m["config"]["loss_type"] == "sigmoid"
    mt = m["metrics"]
    assert mt["steps"] == 2 and mt["trainable_params"] == mt["total_params"] == BASE_PARAMS
    for key in ("eval_accuracy", "eval_margin", "gold_accuracy", "gold_accuracy_initial", "kl"):
        assert isinstance(mt[key], float) and math.isfinite(mt[key]), key
    assert 0 <= mt["eval_accuracy"] <= 1 and mt["kl"] > 0  # two steps at lr 1e-2 move the policy off the reference
    # before the first step the policy is the reference: every implicit reward, hence every margin, is 0
    assert mt["eval_margin_initial"] == 0.0 and mt["eval_accuracy_initial"] == 0.0
    before, after = load_file(Path(tiny_base) / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    AutoModelForCausalLM.from_pretrained(out)  # stock transformers reads it
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in log)


def test_lora_dpo_trains_only_the_adapter_and_loads_in_stock_peft(dpo_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = dpo_run("lora")
    m = manifest(out)
    assert m["mode"] == "lora" and m["metrics"]["trainable_params"] == LORA_PARAMS
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "adapter")
    assert m["metrics"]["kl"] > 0


def test_kl_to_reference_is_zero_for_the_same_model_and_positive_otherwise(tiny_base, tiny_tokenizer):
    import torch

    from lifecycle.generate import render_prompts
    from lifecycle.modeling import load_causal_lm
    from lifecycle.generate import kl_to_reference

    a, b = load_causal_lm(str(tiny_base)).eval(), load_causal_lm(str(tiny_base)).eval()
    prompts = render_prompts(tiny_tokenizer, [[{"role": "user", "content": f"what is {i} plus 3 ?"}] for i in range(4)])
    assert kl_to_reference(a, b, tiny_tokenizer, prompts, max_new_tokens=4, seed=0) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        b.lm_head.weight.mul_(0.0)  # the reference becomes uniform over the vocabulary: KL = Σ_t (log V - H_t) > 0
    assert kl_to_reference(a, b, tiny_tokenizer, prompts, max_new_tokens=4, seed=0) > 0.01


def test_sigterm_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from lifecycle.stages import dpo

    out = tmp_path / "term"
    # a constant learning rate: the interrupted run's schedule spans 1000 steps, the comparison's k + 1
    small = dict(world_prompts=64, world_samples=2, eval_problems=0, kl_samples=0, batch_size=4, warmup_steps=0,
                 save_every=0, log_every=1, lr=1e-2, lr_scheduler="constant")
    cmd = [sys.executable, "-m", "lifecycle", "dpo", "--base", str(tiny_base), "--out", str(out), "--max-steps", "1000"]
    for k, v in small.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 120
    buf = ""
    while time.time() < deadline and p.poll() is None:
        line = p.stdout.readline()
        buf += line
        if line.startswith("step") and "loss" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, buf[-2000:] + err[-2000:]
    assert "Traceback" not in err and "checkpoint saved" in err and "--resume" in err
    assert not (out / "lifecycle.json").exists()
    cks = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert cks
    k = int(cks[-1].name.split("-")[1])
    opts = dict(base=str(tiny_base), max_steps=k + 1, **small)
    dpo.run(build_config(DPOConfig, None, {**opts, "out": str(out), "resume": True}))
    dpo.run(build_config(DPOConfig, None, {**opts, "out": str(tmp_path / "straight")}))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)


def test_cli_dpo_refuses_pairs_without_chosen_and_rejected(tiny_base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "what is 1 plus 2 ?", "good": "3", "bad": "4"}\n')
    p = run_cli("dpo", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--data", str(data))
    assert_usage_error(p, "'chosen'", "'rejected'", "chosen_column")


def test_cli_dpo_refuses_a_reward_model_as_base(tmp_path, tiny_base):
    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import REWARD_HEAD, load_for_training
    from lifecycle.tokenizer import load_tokenizer

    class Full:
        lora = qlora = dora = False

    rm = load_for_training(str(tiny_base), Full(), head=REWARD_HEAD, pad_token_id=0)
    save_model_artifact(rm, load_tokenizer(str(tiny_base)), tmp_path / "rm", stage="reward", config={}, metrics={},
                        parent=None, seed=0)
    p = run_cli("dpo", "--base", str(tmp_path / "rm"), "--out", str(tmp_path / "o"))
    assert_usage_error(p, "--base", "reward")


def test_cli_dpo_refuses_bad_options_in_one_line(tiny_base, tmp_path):
    p = run_cli("dpo", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--beta", "0", "--loss-type", "kto")
    assert_usage_error(p, "beta=0.0", "loss_type='kto'")


def test_default_recipe_restates_the_builtin_defaults():
    from lifecycle.config import read_yaml

    recipe = read_yaml(REPO / "recipes" / "default" / "dpo.yaml")
    defaults = DPOConfig()
    for k, v in recipe.items():
        assert getattr(defaults, k) == v, k


def test_run_recipe_align_puts_dpo_in_the_alignment_slot(tmp_path):
    from lifecycle.errors import UsageError
    from lifecycle.runner import load_recipe

    plan = load_recipe(str(REPO / "recipes" / "default" / "run-dpo.yaml"))
    assert [s for s, _, _ in plan] == ["pretrain", "sft", "dpo"]
    assert plan[-1][1] == str(REPO / "recipes" / "default" / "dpo.yaml")
    (tmp_path / "run.yaml").write_text("stages: {sft: {max_steps: 1}, ppo: {kl_coef: 0.1}}\nalign: dpo\n")
    assert load_recipe(str(tmp_path)) == [("sft", None, {"max_steps": 1}), ("dpo", None, {})]  # no dpo.yaml beside it
    (tmp_path / "run.yaml").write_text("stages: {sft: null}\nalign: rlhf\n")
    with pytest.raises(UsageError, match="align='rlhf'; expected one of ppo, grpo, dpo"):
        load_recipe(str(tmp_path))
