"""`llm run`: the four stages chained through artifacts on disk, then the summary table and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY_RECIPE = """
stages:
  pretrain: {model: llama-micro, seq_len: 32, batch_size: 8, steps: 6, warmup_steps: 2, eval_every: 6, eval_batches: 2,
             world_documents: 300, vocab_size: 300, save_every: 0}
  sft: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_examples: 32, eval_problems: 16, save_every: 0}
  reward: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_prompts: 32, eval_problems: 16, save_every: 0}
  ppo: {steps: 2, prompts_per_rollout: 8, minibatch_size: 4, micro_batch_size: 4, ppo_epochs: 1, world_prompts: 32,
        eval_prompts: 8, eval_every: 2, gate_samples: 8, save_every: 0}
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
