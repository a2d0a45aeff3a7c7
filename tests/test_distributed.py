"""Two processes under `accelerate launch --cpu` train exactly what one process with the same global batch trains."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from lifecycle.launch import requested_processes

TINY = ["--model", "llama-micro", "--set", "seq_len=32", "--set", "steps=6", "--set", "warmup_steps=2",
        "--set", "world_documents=300", "--set", "vocab_size=300", "--set", "eval_every=6", "--set", "log_every=2",
        "--set", "save_every=0", "--set", "eval_batches=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "lifecycle", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_requested_processes_parsing():
    assert requested_processes(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "x"]) == 2
    assert requested_processes(["accelerate", "launch", "--num_processes=4"]) == 4
    assert requested_processes(["accelerate", "launch", "-m", "x"]) == 1


def test_two_process_pretrain_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    from lifecycle.config import PretrainConfig, build_config
    from lifecycle.config import parse_set
    from lifecycle.stages import pretrain

    two = tmp_path / "two"
    r = accelerate_launch(2, "pretrain", "--out", str(two), *TINY, "--set", "batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    sets = [TINY[i + 1] for i in range(2, len(TINY), 2)]
    pretrain.run(build_config(PretrainConfig, None, {"out": str(one), "model": "llama-micro", "batch_size": 4, "grad_accum": 2, **parse_set(sets)}))
    m_two = json.loads((two / "lifecycle.json").read_text())
    m_one = json.loads((one / "lifecycle.json").read_text())
    # Both processes took part: the global batch is 2 x 4 blocks per step.
    assert m_two["metrics"]["tokens_seen"] == m_one["metrics"]["tokens_seen"] == 6 * 8 * 32
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    assert m_two["metrics"]["eval_loss"] == pytest.approx(m_one["metrics"]["eval_loss"], abs=1e-5)


def test_requested_processes_from_config_file(tmp_path):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "recipes/accelerate/cpu-2proc.yaml"
    assert requested_processes(["accelerate", "launch", "--config_file", str(cfg), "-m", "lifecycle"]) == 2
