"""Pieces every loop we own shares: schedule, parameter groups, checkpoints,
graceful interruption, progress lines, metric logs and MFU.

Checkpoints are directories `OUT/checkpoints/step-000200/` written through a
temporary directory and renamed into place, so a kill at any moment leaves
the previous checkpoint or the new one, never a broken one. `state.json` is
written last inside the temporary directory and is what marks a checkpoint as
valid.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from lifecycle.artifacts import atomic_write_json
from lifecycle.errors import UsageError

STATE = "state.json"


# ---------------------------------------------------------------------------
# Accelerator
# ---------------------------------------------------------------------------
def make_accelerator(**kw):
    """An Accelerator that forms a gloo process group on machines without CUDA.

    Accelerate only starts a CPU process group when told it runs on the CPU; so
    `torchrun`/`accelerate launch --num_processes N` on a CPU-only machine would
    otherwise give N independent single-process runs.
    """
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), **kw)


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`.

    step counts optimizer steps from 0; the value is the lr used *for* that step:
        step < warmup:  lr * (step + 1) / warmup
        else:           min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
    (Loshchilov & Hutter 2017, SGDR; warmup as in Goyal et al. 2017.) p is capped at 1.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    p = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (dim >= 2: linear weights, embeddings), none on norms and biases."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Valid checkpoints (state.json present), oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    cks = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / STATE).is_file()]
    return sorted(cks, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest checkpoint whose state.json parses; a damaged newest one falls back to the one before."""
    for ck in reversed(list_checkpoints(out)):
        try:
            json.loads((ck / STATE).read_text(encoding="utf-8"))
            return ck
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def require_checkpoint(out: str | Path) -> Path:
    ck = latest_checkpoint(out)
    if ck is None:
        raise UsageError(f"--resume given but no checkpoint under {checkpoint_root(out)}; drop --resume to start a new run")
    return ck


def save_checkpoint(accelerator, out: str | Path, step: int, state: dict, keep: int, extra_files: dict | None = None) -> Path:
    """Save model/optimizer/RNG (Accelerate's save_state) plus our JSON state, atomically.

    All processes call this (Accelerate saves each rank's RNG); the main process
    renames the finished directory into place and prunes old checkpoints.
    """
    root = checkpoint_root(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_write_json(tmp / STATE, {"step": step, **state})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        # Leftover temporaries from killed runs.
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ck: Path) -> dict:
    """Restore model/optimizer/RNG from `ck` (safetensors + weights_only loads) and return our JSON state."""
    accelerator.load_state(str(ck))
    return json.loads((ck / STATE).read_text(encoding="utf-8"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_disk(out: str | Path, n_params: int, keep: int, bytes_per_param: int = 12) -> None:
    """Refuse to start when the disk cannot hold `keep` + 1 checkpoints plus the artifact.

    A checkpoint holds fp32 weights and two fp32 AdamW moments (12 bytes per
    parameter); one more is written before the oldest is deleted.
    """
    need = n_params * bytes_per_param * (keep + 1) + n_params * 4
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UsageError(
            f"not enough disk space at {probe}: checkpoints and the artifact need ~{need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free space, lower keep_checkpoints, or pick another --out"
        )


def check_finite(step: int, loss: float, grad_norm: float, out: str | Path) -> None:
    """Stop on a non-finite loss or gradient norm, naming the step and the last good checkpoint."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    from lifecycle.errors import TrainingDiverged

    last = latest_checkpoint(out)
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the last good checkpoint is "
        f"{last or 'none (no checkpoint was written yet)'}; usual cures: lower lr, bf16 instead of fp16, "
        f"grad_clip 1.0, more warmup_steps; then continue with --resume"
    )


# ---------------------------------------------------------------------------
# Graceful stop on Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------
class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step.

    The loop then saves a checkpoint and raises `Interrupted`. A second signal
    restores the default handler's behaviour (immediate exit).
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------
# Progress and logs
# ---------------------------------------------------------------------------
class MetricLog:
    """Append one JSON object per line to OUT/log.jsonl (main process only), and to trackers."""

    def __init__(self, path: Path, accelerator=None, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.acc = accelerator
        self.main = accelerator is None or accelerator.is_main_process
        if self.main and truncate_after_step is not None and self.path.exists():
            # On resume drop lines logged after the checkpoint, so the log matches an uninterrupted run.
            keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        elif self.main and truncate_after_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, **metrics: Any) -> None:
        if self.acc is not None and self.acc.trackers:
            self.acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
    """Tokens/s over training time only (evaluation and checkpoints excluded) and ETA."""

    def __init__(self, start_step: int, total_steps: int):
        self.start = self.step_last = start_step
        self.total = total_steps
        self.tokens = 0
        self.seconds = 0.0
        self.all_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.all_seconds += seconds

    def report(self, step: int) -> tuple[float, float]:
        """(tokens/s since the last report, ETA in seconds from the mean step time so far)."""
        tps = self.tokens / max(self.seconds, 1e-9)
        eta = self.all_seconds / max(step - self.start, 1) * (self.total - step)
        self.step_last, self.tokens, self.seconds = step, 0, 0.0
        return tps, eta


# ---------------------------------------------------------------------------
# Model FLOPs utilisation
# ---------------------------------------------------------------------------
def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * layers * d_attn * seq_len.

    The 6N term counts forward (2N) and backward (4N) multiply-adds of every
    weight matrix, the output projection over the vocabulary included (Kaplan
    et al. 2020, Table 1); the second term is the attention score and value
    products (PaLM, Chowdhery et al. 2022, Appendix B).
    """
    d = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "gemma")
    attn = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    mlp = (3 if gated else 2) * d * ff
    n_matmul = layers * (attn + mlp) + d * config.vocab_size
    return 6 * n_matmul + 12 * layers * heads * head_dim * seq_len


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(device, dtype_name: str = "float32", n: int = 1024, reps: int = 5) -> float:
    """Peak dense matmul FLOP/s measured on this device (best of `reps` n x n x n products)."""
    import torch

    key = f"{device}-{dtype_name}-{n}"
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]
