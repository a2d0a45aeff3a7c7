"""`llm run`: the four stages chained through artifacts on disk, then the summary table and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RECIPE = """
stages:
  pretrain: {model: llama-micro, seq_len: 32, batch_size: 8, steps: 6, warmup_steps: 2, eval_every: 6, eval_batches: 2,
             world_documents: 300, vocab_size: 300, save_every: 0}
  sft: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_examples: 32, eval_problems: 16, save_every: 0}
  reward: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_prompts: 32, eval_problems: 16, save_every: 0}
  ppo: {steps: 2, prompts_per_rollout: 8, minibatch_size: 4, micro_batch_size: 4, ppo_epochs: 1, world_prompts: 32,
        eval_prompts: 8, eval_every: 2, gate_samples: 8, save_every: 0}
eval: {docs: 20, problems: 16, batch_size: 16}
"""


def test_run_chains_every_stage_and_writes_the_report(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lifecycle", "run", str(recipe), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = {s: json.loads((out / s / "lifecycle.json").read_text()) for s in ("pretrain", "sft", "reward", "ppo")}
    # Each stage read the one before it: parents are recorded with their content digest.
    assert manifests["pretrain"]["parent"] is None
    assert manifests["sft"]["parent"]["stage"] == "pretrain"
    assert manifests["reward"]["parent"]["stage"] == "sft"
    assert manifests["ppo"]["parent"]["stage"] == "sft"
    from lifecycle.artifacts import artifact_digest

    assert manifests["sft"]["parent"]["digest"] == artifact_digest(out / "pretrain")
    # The summary table and report.md with plots.
    assert "| pretrain | held-out loss" in r.stdout and "| ppo | gold accuracy" in r.stdout
    report = (out / "report.md").read_text()
    assert "![" in report and list((out / "plots").glob("*.png"))
    # A second run skips every stage.
    again = subprocess.run([sys.executable, "-m", "lifecycle", "run", str(recipe), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("is complete; skipping") == 4
    # The run ends with `llm eval --lifecycle`: every causal-LM stage on the same items, in report.md.
    res = json.loads((out / "eval" / "eval.json").read_text())
    assert list(res["models"]) == ["pretrain", "sft", "ppo"]
    assert res["models"]["ppo"]["win_rate"]["vs"] == "sft" and res["models"]["sft"]["win_rate"]["vs"] == "pretrain"
    assert res["config"]["problems"] == 16 and res["config"]["docs"] == 20  # the recipe's `eval:` options
    for name in ("pretrain", "sft", "ppo"):  # each stage's gold accuracy on the 16 problems, as the stage's own eval counts it
        assert 0.0 <= res["models"][name]["language_modelling"]["bits_per_byte"] < 20
    report = (out / "report.md").read_text()
    assert "Every stage on the same held-out items" in report and "| bits per byte |" in report
    assert "eval/plots/" in report and all((out / line.split("](")[1].rstrip(")")).is_file()
                                               for line in report.splitlines() if line.startswith("![") and "eval/" in line)
    # A stage that falls below its parent by more than the margin stops the run (exit 4), naming both numbers.
    m = json.loads((out / "ppo" / "lifecycle.json").read_text())
    m["metrics"]["gold_accuracy_initial"], m["metrics"]["gold_accuracy"] = 0.5, 0.3
    (out / "ppo" / "lifecycle.json").write_text(json.dumps(m))
    stop = subprocess.run([sys.executable, "-m", "lifecycle", "run", str(recipe), "--out", str(out), "--no-evaluate"],
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 4, stop.stderr[-2000:]
    line = stop.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: ppo regressed") and "0.300" in line and "0.500" in line and "--regression-margin -1" in line
    go_on = subprocess.run([sys.executable, "-m", "lifecycle", "run", str(recipe), "--out", str(out), "--no-evaluate",
                            "--regression-margin", "-1"], capture_output=True, text=True, timeout=300)
    assert go_on.returncode == 0, go_on.stderr[-2000:]


def test_regression_rule(tmp_path):
    """A drop of more than the margin in held-out gold accuracy is a regression; equal to it, or no metric, is not."""
    from lifecycle.runner import regression

    def stage(before, after):
        d = tmp_path / f"s{before}-{after}"
        d.mkdir()
        (d / "lifecycle.json").write_text(json.dumps({"metrics": {"gold_accuracy_initial": before, "gold_accuracy": after}}))
        return d

    assert regression(stage(0.5, 0.44), 0.05).startswith("s0.5-0.44 regressed")
    assert regression(stage(0.5, 0.46), 0.05) is None
    assert regression(stage(0.5, 0.0), -1) is None  # negative margin: never stop
    assert regression(stage(0.25, 0.25), 0.0) is None
    assert regression(stage(0.25, 0.2), 0.0) is not None
    none = tmp_path / "none"
    none.mkdir()
    (none / "lifecycle.json").write_text(json.dumps({"metrics": {"eval_loss": 1.0}}))
    assert regression(none, 0.05) is None


# ---------------------------------------------------------------------------
# What a stage takes from its parent and how the TRL stages are set up
# ---------------------------------------------------------------------------
def _sft_cfg(base, **kw):
    from lifecycle.config import SFTConfig, build_config

    return build_config(SFTConfig, None, {"out": "/tmp/unused", "base": str(base), **kw}, check=False)


def test_sft_max_length_inherits_the_parents_training_length(tmp_path, tiny_base, family_dir):
    """max_length 0 (unset) takes the length the parent trained at, capped by the model's context;
    a value the user sets is kept."""
    from dataclasses import replace

    from lifecycle import artifacts
    from lifecycle.finetune import inherit_max_length

    info = artifacts.check_artifact(str(tiny_base), artifacts.CAUSAL_LM, "--base")
    context = json.loads((tiny_base / "config.json").read_text())["max_position_embeddings"]
    assert inherit_max_length(_sft_cfg(tiny_base, max_length=96), info) == 96
    pretrained = replace(info, manifest={**info.manifest, "config": {"seq_len": 64}})
    assert inherit_max_length(_sft_cfg(tiny_base, max_length=0), pretrained) == 64
    long = replace(info, manifest={**info.manifest, "config": {"seq_len": context * 4}})
    assert inherit_max_length(_sft_cfg(tiny_base, max_length=0), long) == context
    after_sft = replace(info, manifest={**info.manifest, "stage": "sft", "config": {"max_length": 48}})
    assert inherit_max_length(_sft_cfg(tiny_base, max_length=0), after_sft) == 48
    # A hub-style directory records no training length: 2048, capped by its context.
    hub = artifacts.check_artifact(str(family_dir("qwen3")), artifacts.CAUSAL_LM, "--base")
    hub_context = json.loads((family_dir("qwen3") / "config.json").read_text())["max_position_embeddings"]
    assert inherit_max_length(_sft_cfg(hub.path, max_length=0), hub) == min(2048, hub_context)
    assert inherit_max_length(_sft_cfg("org/model", max_length=0), artifacts.Artifact("org/model", artifacts.CAUSAL_LM, None, hub=True)) == 2048


def test_ddp_looks_for_unused_parameters_only_in_a_mixture_of_experts(tiny_base, family_dir):
    import trl

    from lifecycle.finetune import trainer_args

    def find_unused(base) -> bool:
        return trainer_args(trl.SFTConfig, _sft_cfg(base), has_eval=False, resuming=False).ddp_find_unused_parameters

    assert find_unused(tiny_base) is False
    assert find_unused(family_dir("qwen3")) is False
    assert find_unused(family_dir("mixtral")) is True
    assert find_unused(family_dir("qwen3_moe")) is True
    assert find_unused("org/unknown-model") is True  # cannot read its config here: keep DDP's search


def test_tensorboard_events_of_every_stage_go_to_out_tb(tmp_path, tiny_base):
    """pretrain and ppo log through Accelerate into OUT/tb/<stage>; the Trainer stages are pointed there too."""
    from types import SimpleNamespace

    import trl
    from transformers.integrations import TensorBoardCallback

    from lifecycle import finetune, training

    out = tmp_path / "sft"
    tb = object.__new__(TensorBoardCallback)  # as the Trainer makes it, without needing tensorboard installed
    tb.tb_writer, tb.logging_dir = None, None
    added = []
    trainer = SimpleNamespace(
        args=finetune.trainer_args(trl.SFTConfig, _sft_cfg(tiny_base, out=str(out)), has_eval=False, resuming=False),
        callback_handler=SimpleNamespace(callbacks=[tb]),
        remove_callback=lambda cb: None, add_callback=added.append,
    )
    finetune.attach_progress(trainer)
    assert Path(tb.logging_dir) == training.tensorboard_dir(out) / "sft" == out / "tb" / "sft"
    # Accelerate's trackers write to <logging_dir>/<run name>; pretrain names its run "pretrain".
    acc = training.make_accelerator(project_config=training.project_config(tmp_path / "pretrain"))
    assert Path(acc.logging_dir) == tmp_path / "pretrain" / "tb"
