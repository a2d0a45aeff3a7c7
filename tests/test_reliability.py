"""Crash safety, divergence guard, pre-flight and reproducibility (pretrain; other stages in their own files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle import checkpoints, training
from lifecycle.config import PretrainConfig, build_config

TINY = dict(model="llama-micro", seq_len=32, batch_size=8, steps=14, warmup_steps=2, lr=3e-3, min_lr=3e-4,
            eval_every=7, eval_batches=2, log_every=2, world_documents=300, vocab_size=300, save_every=0)


def cfg(out, **kw):
    return build_config(PretrainConfig, None, {"out": str(out), **TINY, **kw})


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 mid-run (checkpointing every step, so kills land inside checkpoint writes too), resume, same weights."""
    from lifecycle.stages import pretrain

    steps = 40  # long enough that every kill lands mid-run even on a fast, quiet machine
    ref = tmp_path / "ref"
    pretrain.run(cfg(ref, steps=steps))

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lifecycle", "pretrain", "--out", str(out)]
    for k, v in {**TINY, "save_every": 1, "steps": steps}.items():
        args += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills = 0
    for delay in (0.0, 0.15, 0.4):
        before = checkpoints.latest_checkpoint(out)
        p = subprocess.Popen(args + (["--resume"] if before else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until this run has written a checkpoint of its own, then kill it a moment later.
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            now = checkpoints.latest_checkpoint(out)
            if now is not None and now != before:
                break
            time.sleep(0.02)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        ck = checkpoints.latest_checkpoint(out)
        assert ck is not None
        state = json.loads((ck / "state.json").read_text())
        assert state["step"] == int(ck.name.split("-")[1])
        weights(ck)  # the newest valid checkpoint always loads
        # The artifact is either absent or complete, never half-written.
        from lifecycle.artifacts import is_complete

        assert not (out / "lifecycle.json").exists() or is_complete(out)
    assert kills >= 2
    r = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_diff(weights(ref), weights(out)) <= 1e-6


def test_half_written_checkpoints_are_ignored(tmp_path):
    from lifecycle.stages import pretrain

    out = tmp_path / "run"
    pretrain.run(cfg(out, steps=4, save_every=2))
    root = checkpoints.checkpoint_root(out)
    good = checkpoints.latest_checkpoint(out)
    # A kill during a write leaves a temporary directory, or (never via our writer, but say by a copy) a
    # step directory without state.json, or a state.json cut short: all are skipped.
    (root / ".tmp-step-000009").mkdir()
    (root / ".tmp-step-000009" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "step-000010").mkdir()
    (root / "step-000011").mkdir()
    (root / "step-000011" / "state.json").write_text('{"step": 1')
    assert checkpoints.latest_checkpoint(out) == good


def test_divergence_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    """A NaN learning rate at step 3 poisons the weights; the guard stops at the first non-finite loss."""
    from lifecycle.errors import TrainingDiverged
    from lifecycle.stages import pretrain

    real = training.lr_at
    monkeypatch.setattr(training, "lr_at", lambda step, **kw: float("nan") if step == 2 else real(step, **kw))
    out = tmp_path / "div"
    with pytest.raises(TrainingDiverged, match="diverged at step 4") as e:
        pretrain.run(cfg(out, save_every=2))
    assert "step-000002" in str(e.value) and "lower lr" in str(e.value)
    assert not (out / "lifecycle.json").exists()
    assert [c.name for c in checkpoints.list_checkpoints(out)] == ["step-000002"]
    assert all(t.isfinite().all() for t in weights(checkpoints.latest_checkpoint(out)).values())


def test_resume_of_a_finished_run_remeasures(tmp_path):
    from lifecycle.artifacts import read_manifest
    from lifecycle.stages import pretrain

    out = tmp_path / "done"
    pretrain.run(cfg(out, steps=4))
    first = read_manifest(out)["metrics"]
    pretrain.run(cfg(out, steps=4, resume=True))
    again = read_manifest(out)["metrics"]
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert again["tokens_seen"] == first["tokens_seen"]
    assert again["tokens_per_second"] > 0


def test_disk_check(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lifecycle.errors import UsageError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 10**6))
    with pytest.raises(UsageError, match="not enough disk space"):
        training.check_disk(tmp_path / "new" / "dir", n_params=10**6, keep=2)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    training.check_disk(tmp_path / "new" / "dir", n_params=10**6, keep=2)


def test_same_seed_same_metrics(tmp_path):
    from lifecycle.artifacts import read_manifest
    from lifecycle.stages import pretrain

    pretrain.run(cfg(tmp_path / "a", steps=4))
    pretrain.run(cfg(tmp_path / "b", steps=4))
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert ma["metrics"]["eval_loss"] == mb["metrics"]["eval_loss"]
    assert ma["seed"] == 0 and ma["versions"]["torch"] and ma["config"]["steps"] == 4
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) == 0.0


def test_run_from_manifest_repeats_the_metrics(tmp_path):
    from lifecycle.artifacts import read_manifest
    from lifecycle.runner import run_lifecycle
    from lifecycle.stages import pretrain

    first = tmp_path / "first" / "pretrain"
    pretrain.run(cfg(first, steps=4, seed=3))
    run_lifecycle(None, str(tmp_path / "again"), from_manifest=str(tmp_path / "first"))
    a, b = read_manifest(first), read_manifest(tmp_path / "again" / "pretrain")
    assert b["seed"] == 3 and b["config"]["steps"] == 4
    assert a["metrics"]["eval_loss"] == b["metrics"]["eval_loss"]
    assert (tmp_path / "again" / "report.md").is_file()


def test_memory_preflight_refuses_unless_forced(monkeypatch, tiny_base):
    """A run the estimator says will not fit the device is refused before loading, unless --force."""
    from lifecycle import artifacts, memory, training
    from lifecycle.config import SFTConfig
    from lifecycle.errors import UsageError

    monkeypatch.setattr(memory, "device_memory", lambda *a, **k: 1024)  # a 1 KiB "GPU"
    info = artifacts.check_artifact(str(tiny_base), artifacts.CAUSAL_LM, "--base")
    cfg = build_config(SFTConfig, None, {"out": "/tmp/x", "base": str(tiny_base)}, check=False)
    with pytest.raises(UsageError, match="fit"):
        training.check_memory(cfg, info, "sft")
    cfg.force = True
    training.check_memory(cfg, info, "sft")  # one warning line, no refusal
    monkeypatch.setattr(memory, "device_memory", lambda *a, **k: 10**12)
    cfg.force = False
    training.check_memory(cfg, info, "sft")
