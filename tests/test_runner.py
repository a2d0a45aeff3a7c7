"""`llm run` resumes an interrupted stage from its checkpoints, the Trainer's (sft, reward) as well as our loops'."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_RECIPE = """
stages:
  pretrain: {model: llama-micro, seq_len: 32, batch_size: 8, steps: 6, warmup_steps: 2, eval_every: 6, eval_batches: 2,
             world_documents: 300, vocab_size: 300, save_every: 0}
  sft: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_examples: 32, eval_problems: 16,
        save_every: 2, keep_checkpoints: 2, log_every: 1}
  reward: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_prompts: 32, eval_problems: 16,
           save_every: 2, keep_checkpoints: 2, log_every: 1}
eval: false
"""


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _interrupt_at(monkeypatch, stage: str, step: int) -> None:
    """Make the `stage` ("sft" or "reward") Trainer stop with Ctrl-C's KeyboardInterrupt once it has done `step` steps."""
    import trl
    from transformers import TrainerCallback

    from lifecycle import finetune

    real = finetune.attach_progress

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt

    args_class = {"sft": trl.SFTConfig, "reward": trl.RewardConfig}[stage]

    def attach(trainer, *a, **kw):
        real(trainer, *a, **kw)
        if isinstance(trainer.args, args_class):
            trainer.add_callback(CtrlC())

    monkeypatch.setattr(finetune, "attach_progress", attach)


def test_llm_run_resumes_interrupted_sft_and_reward(tmp_path, monkeypatch, capsys):
    from lifecycle import artifacts, checkpoints
    from lifecycle.runner import run_lifecycle

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_lifecycle(str(recipe), str(ref))  # uninterrupted
    out.mkdir()
    shutil.copytree(ref / "pretrain", out / "pretrain")  # a complete artifact: skipped below
    capsys.readouterr()

    # 1. Ctrl-C in sft after step 3: the Trainer saved step 2; no artifact.
    _interrupt_at(monkeypatch, "sft", 3)
    with pytest.raises(KeyboardInterrupt):
        run_lifecycle(str(recipe), str(out))
    monkeypatch.undo()
    assert [c.name for c in checkpoints.list_checkpoints(out / "sft")] == ["checkpoint-2"]
    assert not artifacts.is_complete(out / "sft")
    assert "pretrain: " in capsys.readouterr().out

    # 2. `llm run` again: sft resumes from step 2 and finishes; Ctrl-C in reward after step 3.
    _interrupt_at(monkeypatch, "reward", 3)
    with pytest.raises(KeyboardInterrupt):
        run_lifecycle(str(recipe), str(out))
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert "== pretrain: " in printed and "is complete; skipping" in printed
    assert f"== sft: resuming from step 2 ({out / 'sft' / 'checkpoints' / 'checkpoint-2'})" in printed
    assert "resumed at step 2/4" in printed  # the Trainer itself continued from there
    assert artifacts.is_complete(out / "sft")
    assert artifacts.read_manifest(out / "sft")["metrics"]["steps"] == 4
    assert [c.name for c in checkpoints.list_checkpoints(out / "reward")] == ["checkpoint-2"]
    assert not artifacts.is_complete(out / "reward")

    # 3. Once more: reward resumes from step 2 and finishes.
    run_lifecycle(str(recipe), str(out))
    printed = capsys.readouterr().out
    assert "== sft: " in printed and printed.count("is complete; skipping") == 2
    assert f"== reward: resuming from step 2 ({out / 'reward' / 'checkpoints' / 'checkpoint-2'})" in printed
    assert "resumed at step 2/4" in printed
    assert artifacts.is_complete(out / "reward")
    assert artifacts.read_manifest(out / "reward")["metrics"]["steps"] == 4

    # Interrupted and resumed, each stage trained exactly what the uninterrupted run trained.
    for stage in ("sft", "reward"):
        a, b = _weights(ref / stage), _weights(out / stage)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, stage
