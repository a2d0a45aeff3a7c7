"""The one home of what the stages share: rank-0 printing, library silencing,
tracker and memory checks, data order, schedule, parameter groups, graceful
interruption, progress lines, metric logs and MFU.

Checkpoints have their own module, lifecycle/checkpoints.py (one vocabulary for
our loops' `step-N` and the Trainer's `checkpoint-N`).

No torch at module level: `lifecycle.runner` and the TRL-based stages import
this before they need torch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from lifecycle.errors import UsageError


# ---------------------------------------------------------------------------
# Printing and library chatter
# ---------------------------------------------------------------------------
def say(*parts: Any) -> None:
    """Print on the main process only (every rank runs the same code; one line per event)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(*parts, flush=True)


def quiet() -> None:
    """Silence library chatter (load/map progress bars, advisory warnings); our own progress lines stay."""
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ...": optional kernel
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def format_eta(seconds: float) -> str:
    """`4m05s`, or `1h07m` from an hour on."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------
# Checks every stage makes before loading weights
# ---------------------------------------------------------------------------
def check_tracker(cfg: Any) -> None:
    """--report-to needs its package; say so before any weights are loaded."""
    import importlib.util

    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UsageError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package, which is not installed; "
                         f"pip install 'llm-lifecycle[{cfg.report_to}]' or drop --report-to")


def tensorboard_dir(out: str | Path) -> Path:
    """Where every stage's TensorBoard events go: OUT/tb/<stage>/."""
    return Path(out) / "tb"


def project_config(out: str | Path):
    """Accelerate's project settings for a loop we own: trackers log under OUT/tb (Accelerate
    adds the run name given to init_trackers, the stage: OUT/tb/pretrain)."""
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(out), logging_dir=str(tensorboard_dir(out)))


def check_memory(cfg: Any, model: Any, stage: str, *, batch_size: int | None = None, seq_len: int | None = None,
                 gpus: int = 1, echo=None, device_bytes: int | None = None, force: bool | None = None, **estimate_kw: Any):
    """The memory estimator's verdict for a stage config: refuse (unless --force) a run that will not fit the GPU.

    `model` is a model config (a config.json's content as a dict) or an input
    Artifact (its config.json is read; a hub id is not checked). The batch is the
    config's micro-batch, the sequence its seq_len (pretrain) or max_length, unless
    given. Returns the estimate, or None where there is nothing to estimate (a hub
    id, or an architecture the estimator cannot model: it says so in one line).
    `device_bytes` stands for the GPU's memory (default: ask the device), `force`
    for the config's --force (a sweep asks without forcing). Other keywords go to `memory.estimate`
    (PPO's `rollout_batch_size`).
    """
    from lifecycle import memory

    if not isinstance(model, dict):
        if getattr(model, "hub", False):
            return None
        model = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    if getattr(cfg, "qlora", False):
        method = "qlora"
    elif getattr(cfg, "lora", False) or getattr(cfg, "dora", False):
        method = "lora"
    else:
        method = "full"
    kw: dict[str, Any] = {"dtype": {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "fp32"), **estimate_kw}
    if hasattr(cfg, "lora_r"):
        kw["lora_r"] = cfg.lora_r
    if getattr(cfg, "gradient_checkpointing", False):
        kw["grad_ckpt"] = "full"
    if stage in ("pretrain", "sft", "reward"):  # these free gradients between steps (zero_grad(set_to_none=True))
        kw["grad_accum"] = cfg.grad_accum
    if method != "full":
        kw["lora_dropout"] = getattr(cfg, "lora_dropout", 0.0)
    if seq_len is None:
        seq_len = getattr(cfg, "seq_len", None) or cfg.max_length
    if not seq_len:  # sft's max_length 0 before the stage resolves it: the model's context, at most 2048
        seq_len = min(2048, model.get("max_position_embeddings") or model.get("n_positions") or 2048)
    return memory.check_fits(model, stage=stage, method=method, batch_size=batch_size or cfg.batch_size,
                             seq_len=seq_len, force=cfg.force if force is None else force, gpus=gpus,
                             device_bytes=device_bytes, echo=echo or say, **kw)


# ---------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------
def batch_indices(step: int, global_batch: int, n: int, seed: int, *, rng: str = "torch") -> list[int]:
    """Indices of the global batch for `step`: items [step·G, (step+1)·G) of an endless stream
    of seeded per-epoch permutations of range(n).

    A pure function of (seed, step), so resuming needs only the step number, and
    every epoch visits each item once. `rng` picks how an epoch's permutation is
    drawn; each stage keeps the one it was tuned with, so its data order never moves:
      "torch":  torch.randperm with a generator seeded seed·100003 + epoch (pretrain)
      "python": random.Random(seed·1000003 + epoch).shuffle (ppo)
    """
    if rng not in ("torch", "python"):
        raise ValueError(f"rng={rng!r}; expected 'torch' or 'python'")
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch, rng)
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset : offset + take])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int, rng: str) -> tuple[int, ...]:
    """One epoch's permutation, drawn once per epoch instead of at every step (about 1 ms per step saved on the
    default recipe's 60,000 documents); the same numbers as drawing it afresh, so the data order is unchanged."""
    if rng == "torch":
        import torch

        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return tuple(torch.randperm(n, generator=g).tolist())
    import random

    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


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
# Guards
# ---------------------------------------------------------------------------
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
    from lifecycle.checkpoints import latest_checkpoint
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


# Published dense peaks of NVIDIA cards (datasheets, without sparsity), FLOP/s:
# (bf16/fp16 on tensor cores, fp32 without TF32, which torch leaves off for matmuls by default).
# Looked up by substring of torch.cuda.get_device_name(); more specific names first ("A100" before "A10").
PUBLISHED_PEAKS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
    "RTX 4090": (165e12, 82.6e12),
}


def published_peak_flops(card: str, dtype_name: str) -> tuple[str, float] | None:
    """(table name, dense peak FLOP/s) of a card named like torch.cuda.get_device_name(), or None if unknown.

    bf16 and fp16 use the tensor-core column, anything else the fp32 one.
    """
    for name, (half, single) in PUBLISHED_PEAKS.items():
        if name in card:
            return name, half if dtype_name in ("bfloat16", "float16") else single
    return None


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(device, dtype_name: str = "float32", n: int | None = None, reps: int = 10,
                        fresh: bool = False) -> float:
    """Peak dense matmul FLOP/s measured on this device: the best of `reps` n x n x n products at
    several sizes (one size `n` when given). Cached per device and dtype unless `fresh`.

    The operands come from a generator of their own, never the global RNG: the probe runs after
    a resumed checkpoint's RNG state is restored, and must not move the dropout masks that follow.
    """
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    sizes = (n,) if n else ((1024, 2048, 4096, 8192) if cuda else (256, 512, 1024))
    key = f"{device}-{dtype_name}-{sizes}"
    if key in _PEAK_CACHE and not fresh:
        return _PEAK_CACHE[key]
    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection, caches
        sync()
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * size**3 / max(time.perf_counter() - t, 1e-12))
    _PEAK_CACHE[key] = max(best, _PEAK_CACHE.get(key, 0.0))
    return _PEAK_CACHE[key]


class PeakFlops:
    """The denominator of MFU: the card's published dense peak, or else a measured one.

    On a CUDA card in PUBLISHED_PEAKS the datasheet figure is used. Elsewhere the peak is
    measured (several sizes, best of many); since a busy machine at start-up measures too
    low, a later step whose model FLOP/s beat the peak triggers a fresh measurement, and the
    peak becomes the larger of that and the achieved rate. So MFU never exceeds 100%.
    `measure(fresh=False)` stands in for measured_peak_flops (tests pass a fake).
    """

    def __init__(self, device, dtype_name: str = "float32", *, card: str | None = None, measure=None):
        self._measure = measure or (lambda fresh=False: measured_peak_flops(device, dtype_name, fresh=fresh))
        if card is None and getattr(device, "type", str(device)) == "cuda":
            import torch

            card = torch.cuda.get_device_name(device)
        published = published_peak_flops(card, dtype_name) if card else None
        self.precision = "bf16" if dtype_name in ("bfloat16", "float16") else "fp32"
        self.card = published[0] if published else None  # None: the peak is measured
        self.value = published[1] if published else self._measure()
        self.raised = False

    def mfu(self, achieved: float) -> float:
        """achieved / peak, at most 1: an achieved rate above the peak re-measures and raises the peak first
        (a datasheet figure beaten, e.g. with TF32 turned on, is replaced by a measurement too)."""
        if achieved > self.value:
            self.value = max(achieved, self._measure(fresh=True))
            self.card, self.raised = None, True
        return achieved / self.value

    def label(self) -> str:
        """Which peak MFU is of, for the progress line: `H100 bf16 peak` or `measured fp32 peak`."""
        return f"{self.card} {self.precision} peak" if self.card else f"measured {self.precision} peak"

    def describe(self) -> str:
        """The peak in full, for the start-up line."""
        if self.card:
            return f"published {self.card} {self.precision} dense peak {self.value / 1e12:,.0f} TFLOP/s"
        raised = ", raised by a faster step" if self.raised else ""
        return f"measured {self.precision} matmul peak {self.value / 1e9:,.1f} GFLOP/s{raised}"
