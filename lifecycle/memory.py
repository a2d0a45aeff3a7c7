"""Training-memory estimator: pure arithmetic, no torch import at module level.

`estimate(config, stage=..., method=..., ...)` predicts, per GPU, the bytes a
training step holds at its peak, split into rows (parameters, gradients,
optimizer state, fp32 master copy, 16-bit weight copies, activations, logits,
quantization constants, LoRA weights, transients, CUDA overhead). The stages
call `check_fits(...)` before loading weights; `llm estimate-memory` prints the
same estimate (`cli_estimate`); `llm estimate-memory --measure`
(lifecycle/memory_measure.py, dispatched by cli.py) runs one real step and
compares row by row.

Two ways to know a model:
  closed form   Llama-style (llama, mistral, qwen2, qwen3) and GPT-2 configs: the
                parameter table and an op-by-op simulation of what autograd saves
                (lifecycle/memory_arch.py, lifecycle/memory_sim.py). Plain Python
                on ints: `llm estimate-memory --model qwen3-8b` answers in well
                under a second.
  generic       every other decoder-only causal LM that transformers can build:
                the real module on fake tensors, parameters read off its module
                tree and saved tensors caught as `--measure` catches them
                (lifecycle/memory_trace.py; imports torch, only when needed).
When neither can model a config, `estimate` raises CannotEstimate; the stages'
`check_fits` turns that into one warning line and lets the run go on.

This module (~650 lines) is the estimate itself: the rows of five stages (PPO's
four roles among them), ZeRO sharding, the phases that set the peak, the
largest-micro-batch search, the check the stages call and the command; its
parts (shapes, model states, the activation simulation, the tracer, presets)
live in the modules named above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from lifecycle.errors import UsageError
from lifecycle.memory_arch import (DTYPES, LORA_ROLES, NoClosedForm, ParamSpec, Shape, dtypes_for, nf4_bytes,  # noqa: F401
                                   param_table, regime_of, shape_from_config)
from lifecycle.memory_sim import activation_rows
from lifecycle.memory_states import model_states, zero_model_state_bytes  # noqa: F401
from lifecycle.presets import PUBLISHED_PARAMS, load_model_config  # noqa: F401

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "inference")
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("mixed", "pure")
MP_STYLES = ("autocast", "master")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor")
CKPT = ("none", "full")
ATTN = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")

# CUDA context (driver, kernels, cuBLAS/cuDNN handles) is outside torch's allocator:
# torch.cuda.max_memory_allocated never shows it, nvidia-smi does. ~0.5 GiB is typical
# for CUDA 12 on A100/H100; the allocator's caching/fragmentation adds a few percent.
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_MARGIN = 0.05



# ---------------------------------------------------------------------------
# 1. Sizes: parsing and printing
# ---------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}


def parse_size(text: str | int | float) -> int:
    """'80GiB', '80GB', '24g', '81920MiB', 8.5e10 -> bytes (decimal for GB, binary for GiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        s = str(text).strip().lower().replace(" ", "")
        i = len(s)
        while i > 0 and s[i - 1].isalpha():
            i -= 1
        num, unit = s[:i], s[i:]
        try:
            value = float(num)
        except ValueError:
            raise UsageError(f"cannot read the memory size {text!r}; write for example 80GiB, 80GB or 24GiB") from None
    if unit not in _UNITS:
        raise UsageError(f"unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)")
    if not value > 0 or math.isinf(value):
        raise UsageError(f"memory size {text!r} must be positive")
    return int(value * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    """Bytes as GiB/MiB/KiB with three significant digits."""
    n = float(n)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n / size < 1000 else f"{n / size:.0f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------
# 2. The estimate
# ---------------------------------------------------------------------------
ROW_NOTES = {
    "params_bytes": "model weights",
    "lora_params_bytes": "LoRA adapter weights",
    "quant_constants_bytes": "NF4 absmax + double-quant constants",
    "master_bytes": "fp32 master copy of trainable weights",
    "grads_bytes": "gradients of trainable weights",
    "optimizer_bytes": "optimizer state",
    "ddp_buckets_bytes": "DDP gradient buckets (gradient_as_bucket_view=False, the default)",
    "weight_copies_bytes": "16-bit weight copies autocast keeps for backward",
    "activations_bytes": "tensors saved for backward",
    "logits_bytes": "logits held by the output + fp32 log-softmax saved by the loss",
    "kv_cache_bytes": "KV cache",
    "loss_backward_bytes": "transient: grads of the fp32 log-probs and logits at the start of backward",
    "recompute_bytes": "transient: one layer's activations recomputed in backward",
    "autocast_cache_bytes": "transient: cached 16-bit casts alive until the end of forward",
    "zero3_gather_bytes": "transient: ZeRO-3 all-gathered parameters (current + prefetched layer)",
    "optimizer_step_bytes": "transient: optimizer.step() temporaries",
    "overhead_bytes": "CUDA context + allocator margin",
}
STATE_ROWS = ("params_bytes", "lora_params_bytes", "quant_constants_bytes", "master_bytes", "grads_bytes", "optimizer_bytes",
              "ddp_buckets_bytes")
FWD_ROWS = ("weight_copies_bytes", "activations_bytes", "logits_bytes", "kv_cache_bytes")


@dataclass
class Estimate:
    """The per-GPU estimate. `rows` maps row name -> bytes; `total_bytes` is the peak."""

    model: str
    settings: dict
    regime: str
    n_params: int
    n_trainable: int
    rows: dict
    notes: dict
    total_bytes: int
    peak_phase: str
    details: dict = field(default_factory=dict)
    roles: list = field(default_factory=list)
    device_bytes: int | None = None
    fits: bool | None = None
    max_batch_size: int | None = None
    warnings: list = field(default_factory=list)

    def __getitem__(self, key: str) -> int:
        return self.total_bytes if key == "total_bytes" else self.rows.get(key, 0)

    def to_dict(self) -> dict:
        d = {"model": self.model, "settings": self.settings, "regime": self.regime, "n_params": self.n_params,
             "n_trainable": self.n_trainable}
        d.update({k: int(v) for k, v in self.rows.items()})
        d["total_bytes"] = int(self.total_bytes)
        d["peak_phase"] = self.peak_phase
        d["notes"] = self.notes
        d["details"] = self.details
        if self.roles:
            d["roles"] = self.roles
        d["device_bytes"] = self.device_bytes
        d["fits"] = self.fits
        d["max_batch_size"] = self.max_batch_size
        d["warnings"] = self.warnings
        return d

    def table(self) -> str:
        st = self.settings
        head = (f"{self.model}: {st['stage']}, {st['method']}"
                + (f" (r={st['lora_r']})" if st["method"] != "full" else "")
                + f", {self.regime}, {st['optimizer']}, batch {st['batch_size']} x seq {st['seq_len']}, "
                f"{st['attn']}, grad ckpt {st['grad_ckpt']}, {st['gpus']} GPU{'s' if st['gpus'] > 1 else ''} "
                f"(ZeRO-{st['zero']}), device {st['device']}")
        lines = [head, f"parameters: {fmt_count(self.n_params)} total, {fmt_count(self.n_trainable)} trainable", ""]
        w = max(len(k) for k in self.rows) + 2
        lines.append(f"{'row (per GPU)':<{w}}{'bytes':>12}  note")
        for k, v in self.rows.items():
            if v or k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"):
                lines.append(f"{k:<{w}}{fmt_bytes(v):>12}  {self.notes.get(k, '')}")
        lines.append(f"{'total_bytes':<{w}}{fmt_bytes(self.total_bytes):>12}  peak ({self.peak_phase})")
        for r in self.roles:
            lines.append(f"  {r['role']:<10} {'trains' if r['trains'] else 'frozen':<7} {fmt_bytes(r['bytes']):>10}  {r['what']}")
        if "rollout_kv_cache_bytes" in self.details:
            d = self.details
            lines.append(f"rollout: KV cache {fmt_bytes(d['rollout_kv_cache_bytes'])} for {d['rollout_batch_size']} sequences "
                         f"sampled at once; {fmt_bytes(d['rollout_total_bytes'])} with the weights and states above")
        if self.device_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append("")
            lines.append(f"verdict: {verdict} in {fmt_bytes(self.device_bytes)} per GPU "
                         f"({100 * self.total_bytes / self.device_bytes:.0f}% used); largest micro-batch that fits: "
                         f"{self.max_batch_size if self.max_batch_size else 'none (not even batch 1)'}")
        for wmsg in self.warnings:
            lines.append(f"note: {wmsg}")
        return "\n".join(lines)


def _regime_label(regime: str, style: str, dtype: str, method: str = "full") -> str:
    adapters = method != "full"
    if regime == "fp32":
        return "fp32"
    if regime == "pure":
        return (f"pure {dtype} (16-bit frozen base, fp32 adapters as peft keeps them)" if adapters else
                f"pure {dtype} (16-bit weights and optimizer states, no master copy)")
    if style == "autocast" and method == "qlora":
        return f"mixed {dtype} (autocast; 4-bit base with fp32 norms, embeddings and head, as peft prepares it)"
    if style == "autocast":
        return (f"mixed {dtype} (autocast; frozen base in {dtype}, fp32 adapters)" if adapters else
                f"mixed {dtype} (autocast: fp32 weights and grads, 16-bit compute copies)")
    return f"mixed {dtype} (16-bit weights and grads + fp32 master copy, as DeepSpeed/Megatron)"


def validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len, lora_r,
              device, mp_style) -> None:
    problems = []
    for name, val, allowed in (("--stage", stage, STAGES), ("--method", method, METHODS), ("--dtype", dtype, tuple(DTYPES)),
                               ("--optimizer", optimizer, OPTIMIZERS), ("--grad-ckpt", grad_ckpt, CKPT),
                               ("--attn", attn, ATTN), ("--device", device, DEVICES)):
        if val not in allowed:
            problems.append(f"{name} {val!r}; expected one of {', '.join(allowed)}")
    if precision is not None and precision not in PRECISIONS:
        problems.append(f"--precision {precision!r}; expected mixed or pure")
    if mp_style is not None and mp_style not in MP_STYLES:
        problems.append(f"--mp-style {mp_style!r}; expected autocast or master")
    for name, val in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--gpus", gpus)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            problems.append(f"{name} {val}; must be a positive integer")
    if method != "full" and (not isinstance(lora_r, int) or lora_r < 1):
        problems.append(f"--lora-r {lora_r}; must be a positive integer")
    if zero not in (0, 1, 2, 3):
        problems.append(f"--zero {zero}; expected 0, 1, 2 or 3")
    elif zero > 0 and isinstance(gpus, int) and gpus == 1:
        problems.append(f"--zero {zero} with --gpus 1: ZeRO shards optimizer state (1), gradients (2) and parameters (3) "
                        f"across data-parallel GPUs, so with one GPU it saves nothing; pass --gpus N (N > 1) or --zero 0")
    if zero > 0 and stage == "inference":
        problems.append("--zero applies to training; drop it for --stage inference")
    if problems:
        raise UsageError("; ".join(problems))


class CannotEstimate(UsageError):
    """Neither the closed form nor the generic path can model this config (one line: the model_type and why)."""


def model_shape(config: dict) -> Shape:
    """The closed-form Shape of a config, or a "generic" Shape counted from the real module on fake tensors."""
    try:
        return shape_from_config(config)
    except NoClosedForm:
        return generic_shape(config)


def generic_shape(config: dict) -> Shape:
    """A Shape whose parameters and activations come from the real transformers module (lifecycle/memory_trace.py)."""
    mt = str(config.get("model_type") or "(none)")
    try:
        from lifecycle import memory_trace   # torch from here on: only for architectures without a closed form
    except ImportError as e:
        raise CannotEstimate(f"cannot estimate memory for model_type {mt} (no closed form, and the generic path "
                             f"needs torch and transformers: {e})") from None
    try:
        _, dims = memory_trace.params(config, "lm")
    except memory_trace.CannotTrace as e:
        raise CannotEstimate(f"cannot estimate memory for model_type {mt} ({e}); "
                             f"pass a decoder-only causal LM config.json") from None
    return Shape(arch="generic", hidden=dims["hidden"], layers=dims["layers"], heads=dims["heads"],
                 kv_heads=dims["kv_heads"], head_dim=dims["head_dim"], intermediate=dims["intermediate"],
                 vocab=dims["vocab"], tied=dims["tied"], max_positions=dims["max_positions"], model_type=mt,
                 config_json=json.dumps(config, sort_keys=True))


def _table(sh: Shape, head: str = "lm") -> list[ParamSpec]:
    if sh.arch != "generic":
        return param_table(sh, head=head)
    from lifecycle import memory_trace

    return memory_trace.params(json.loads(sh.config_json), head)[0]


def count_params(config: dict | Shape) -> int:
    """Parameters of the causal LM (tied weights once): closed form, or the real module tree."""
    sh = config if isinstance(config, Shape) else model_shape(config)
    return sum(p.numel for p in _table(sh, "lm"))


def _states(sh: Shape, *, head: str, method: str, lora_r: int, **kw: Any) -> dict[str, int]:
    generic_lora: list[ParamSpec] = []
    if sh.arch == "generic" and method != "full":
        from lifecycle import memory_trace

        generic_lora = memory_trace.lora_params(json.loads(sh.config_json), head, lora_r)
    return model_states(sh, _table(sh, head), generic_lora, method=method, lora_r=lora_r, **kw)


def _activations(sh: Shape, *, b: int, s: int, method: str, regime: str, style: str, half: int, attn: str,
                 ckpt: bool, device: str, lora_r: int, lora_roles: tuple, lora_dropout: float, dropout: bool,
                 head: str = "lm", stage: str = "sft") -> dict[str, Any]:
    """The forward/backward rows of one trained model: simulated (closed form) or traced (generic)."""
    if sh.arch != "generic":
        return activation_rows(sh, b=b, s=s, method=method, regime=regime, style=style, half=half, attn=attn,
                               ckpt=ckpt, device=device, lora_r=lora_r, lora_roles=lora_roles,
                               lora_dropout=lora_dropout, dropout=dropout, head=head, stage=stage)
    from lifecycle import memory_trace

    d = dtypes_for(regime, style, half, method, True, stage)
    fused = stage == "sft" and head == "lm"
    st = memory_trace.Settings(head=head, method=method, pdt=d["pdt"], adt=d["adt"], half=half,
                               autocast=d["autocast"], attn=attn, ckpt=ckpt, lora_r=lora_r, lora_dropout=lora_dropout,
                               loss="fused" if fused else "full")
    cfg = json.loads(sh.config_json)
    try:
        t = memory_trace.trace(cfg, st, b, s)
        recompute = max(memory_trace.trace(cfg, replace(st, ckpt=False), b, s, per_layer=True)["layers"],
                        default=0) if ckpt else 0
    except memory_trace.CannotTrace as e:
        raise CannotEstimate(f"cannot estimate memory for model_type {sh.model_type} ({e})") from None
    return {
        "weight_copies_bytes": t["copy"],
        "activations_bytes": t["act"],
        "logits_bytes": t["logits"] + t.get("held_logits", 0),
        "loss_backward_bytes": t["loss_backward"] if fused else (2 * 4 * b * s * sh.vocab if head == "lm" else 0),
        "recompute_bytes": recompute,
        "autocast_cache_bytes": t["cache"],
        "attn_s2": 0,
        "lora_act": 0,
        "attn_used": t["attn"],
    }


def estimate(
    config: dict | Shape,
    *,
    stage: str = "sft",
    method: str = "full",
    lora_r: int = 8,
    dtype: str = "bf16",
    precision: str | None = None,
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 2048,
    grad_ckpt: str = "none",
    attn: str = "sdpa",
    zero: int = 0,
    gpus: int = 1,
    device: str = "cuda",
    mp_style: str | None = None,
    lora_dropout: float = 0.0,
    lora_targets: Iterable[str] | None = None,
    dropout: bool = True,
    grad_accum: int | None = None,
    gpu_memory: int | None = None,
    name: str = "model",
    rollout_batch_size: int | None = None,
    absent_roles: tuple[str, ...] = (),
) -> Estimate:
    """Predict per-GPU memory of one training step (or inference) of `config`.

    `config` is a transformers config dict (or a Shape). `device` picks the
    backend rules: "cuda" (the default; adds CUDA context/allocator overhead) or
    "cpu" (what `--measure` checks on a machine without a GPU). `gpu_memory`
    (bytes) adds a verdict and the largest micro-batch that fits. `grad_accum`: micro-batches
    per optimizer step; 1 frees the gradients between steps (zero_grad(set_to_none=True)),
    so the forward holds none; None (unknown) or > 1 counts them through the whole step.
    `rollout_batch_size` (ppo, grpo): sequences sampled at once, whose KV cache the rollout holds
    (PPO's `rollout_micro_batch_size`, else its rollout batch per process); None: `batch_size`.
    `absent_roles` (dpo, grpo): frozen roles the run does not load ("reference" with GRPO's kl_coef 0,
    "reward" with a reward function).
    """
    validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len, lora_r,
              device, mp_style)
    if grad_accum is not None and (not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1):
        raise UsageError(f"grad_accum {grad_accum}; must be a positive integer")
    sh = config if isinstance(config, Shape) else model_shape(config)
    if sh.sliding_window and seq_len > sh.sliding_window and not isinstance(config, Shape):
        sh = generic_shape(config)   # an explicit local-attention mask changes the kernels: trace the real module
    kw = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision, optimizer=optimizer,
              seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn, zero=zero, gpus=gpus, device=device, mp_style=mp_style,
              lora_dropout=lora_dropout, lora_targets=tuple(lora_targets) if lora_targets else None, dropout=dropout,
              grad_accum=grad_accum, name=name, rollout_batch_size=rollout_batch_size,
              absent_roles=tuple(absent_roles))
    if sh.arch == "gpt2" and seq_len > sh.max_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's n_positions={sh.max_positions} (GPT-2 has learned "
                         f"positions); pass --seq-len {sh.max_positions} or less")
    est = _estimate(sh, batch_size=batch_size, **kw)
    if sh.arch != "gpt2" and seq_len > sh.max_positions:
        est.warnings.append(f"seq_len {seq_len} exceeds max_position_embeddings={sh.max_positions}")
    if gpu_memory:
        est.device_bytes = int(gpu_memory)
        est.fits = est.total_bytes <= gpu_memory
        est.max_batch_size = _max_batch(sh, kw, int(gpu_memory))
    return est


def _max_batch(sh: Shape, kw: dict, limit: int) -> int:
    """Largest micro-batch whose estimate fits `limit` (0 when batch 1 does not)."""
    def fits(b: int) -> bool:
        return _estimate(sh, batch_size=b, **kw).total_bytes <= limit
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= 1 << 20 and fits(hi):
        lo, hi = hi, hi * 2
    if hi > 1 << 20:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _estimate(sh: Shape, *, stage: str, method: str, lora_r: int, dtype: str, precision: str | None, optimizer: str,
              batch_size: int, seq_len: int, grad_ckpt: str, attn: str, zero: int, gpus: int, device: str,
              mp_style: str | None, lora_dropout: float, lora_targets: tuple | None, dropout: bool, name: str,
              grad_accum: int | None = None, rollout_batch_size: int | None = None,
              absent_roles: tuple[str, ...] = ()) -> Estimate:
    regime, style = regime_of(dtype, precision, zero, mp_style)
    half = DTYPES[dtype] if regime != "fp32" else 4
    roles_all = LORA_ROLES.get(sh.arch, ("linear",))
    lora_roles = tuple(r for r in roles_all if r in lora_targets) if lora_targets else roles_all
    settings = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=regime, mp_style=style or None,
                    optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn,
                    zero=zero, gpus=gpus, device=device, lora_targets=list(lora_roles) if method != "full" else None)
    common = dict(method=method, regime=regime, style=style, half=half, lora_r=lora_r, lora_roles=lora_roles,
                  device=device, stage=stage)
    act_kw = dict(attn=attn, ckpt=grad_ckpt == "full", lora_dropout=lora_dropout, dropout=dropout)
    notes = dict(ROW_NOTES)
    warnings: list[str] = []
    details: dict[str, Any] = {}
    roles: list[dict] = []

    if stage == "inference":
        ms = _states(sh, optimizer=optimizer, trains=False, head="lm", **common)
        kdt = 4 if regime == "fp32" else half
        kv = 2 * sh.layers * sh.kv_heads * sh.head_dim * seq_len * batch_size * kdt
        # prefill: one layer's largest temporaries (gate, up, silu*up) + last-token logits (+ fp32 copy)
        prefill = batch_size * seq_len * (3 * sh.intermediate + 2 * sh.hidden) * kdt
        if attn == "eager":
            prefill += batch_size * sh.heads * seq_len * seq_len * (4 + kdt)
        rows = {k: ms[k] for k in ("params_bytes", "lora_params_bytes", "quant_constants_bytes")}
        rows.update(kv_cache_bytes=kv, activations_bytes=prefill, logits_bytes=batch_size * sh.vocab * (kdt + 4))
        notes["kv_cache_bytes"] = f"2 x layers x kv_heads x head_dim x seq_len x batch x {kdt} B"
        notes["activations_bytes"] = "transient prefill temporaries of one layer"
        notes["logits_bytes"] = "last-token logits (+ fp32 copy for sampling)"
        total = sum(rows.values())
        phase = "generation"
        n_params, n_train = ms["n_params"], 0
    else:
        b = batch_size * (2 if stage in ("reward", "dpo") else 1)   # chosen + rejected in one forward (TRL)
        head = "score" if stage == "reward" else "lm"
        model_list = [("actor" if stage == "ppo" else "policy", True, head)]
        if stage == "ppo":
            model_list += [("critic", True, "score"), ("reference", False, "lm"), ("reward", False, "score")]
        if stage in ("dpo", "grpo"):  # DPO: the frozen reference; GRPO: also a reward model (with --reward)
            model_list += [("reference", False, "lm")] + ([("reward", False, "score")] if stage == "grpo" else [])
            model_list = [m for m in model_list if m[0] not in absent_roles]
        states = {k: 0 for k in STATE_ROWS}   # ddp_buckets_bytes is filled in below
        step_temp, largest_layer = 0, 0
        fwd_phases = []
        n_params = n_train = 0
        for role, trains, hd in model_list:
            if role == "reference" and method != "full":
                roles.append(dict(role=role, trains=False, bytes=0,
                                  what="the actor's base weights with its adapters disabled (no copy)"))
                continue
            ms = _states(sh, optimizer=optimizer, trains=trains, head=hd, **common)
            for k in STATE_ROWS:
                states[k] += ms.get(k, 0)
            step_temp += ms["optimizer_step_bytes"]
            largest_layer = max(largest_layer, ms["largest_layer"])
            if role in ("actor", "policy"):
                n_params += ms["n_params"]
            if trains:
                n_train += ms["n_trainable"]
                a = _activations(sh, b=b, s=seq_len, head=hd, **common, **act_kw)
                fwd_phases.append((role, a))
            if stage in ("ppo", "dpo", "grpo"):
                roles.append(dict(role=role, trains=trains, bytes=sum(ms.get(k, 0) for k in STATE_ROWS),
                                  what=("trains: weights + grads + optimizer" if trains else "frozen weights, forward only")
                                  + (" (value head)" if hd == "score" else "")))
        # the trained models run forward/backward one after another: the largest phase counts
        role, a = max(fwd_phases, key=lambda ra: sum(ra[1][k] for k in ("weight_copies_bytes", "activations_bytes",
                                                                         "logits_bytes", "loss_backward_bytes",
                                                                         "recompute_bytes")))
        if stage in ("ppo", "grpo"):  # both sample their responses with a KV cache
            details["activations_from"] = role
            kdt = 4 if regime == "fp32" else half
            rb = rollout_batch_size or batch_size
            details["rollout_batch_size"] = rb
            details["rollout_kv_cache_bytes"] = 2 * sh.layers * sh.kv_heads * sh.head_dim * seq_len * rb * kdt
        rows = dict(states)
        rows["weight_copies_bytes"] = a["weight_copies_bytes"]
        rows["activations_bytes"] = a["activations_bytes"]
        rows["logits_bytes"] = a["logits_bytes"]
        details["attention_s2_bytes"] = a["attn_s2"]
        details["lora_activation_bytes"] = a["lora_act"]
        if sh.arch == "generic":
            details["activations_method"] = ("traced: the real transformers module on fake tensors, saved tensors "
                                             "counted per storage (CPU kernel rules; batch > 2 extrapolated linearly)")
            if a.get("attn_used") and a["attn_used"] != attn:
                warnings.append(f"{sh.model_type} has no {attn} attention in transformers: traced with "
                                f"{a['attn_used']} attention")
            if method == "qlora":
                warnings.append("qlora activations traced as LoRA on a 16-bit frozen base (4-bit kernels do not run "
                                "on fake tensors)")
        # ZeRO sharding across data-parallel GPUs (Rajbhandari et al. 2019, sec. 5)
        if zero >= 1:
            rows["optimizer_bytes"] = -(-rows["optimizer_bytes"] // gpus)
            rows["master_bytes"] = -(-rows["master_bytes"] // gpus)
        if zero >= 2:
            rows["grads_bytes"] = -(-rows["grads_bytes"] // gpus)
        if zero == 0 and gpus > 1:
            rows["ddp_buckets_bytes"] = rows["grads_bytes"]   # DDP all-reduces through its own flat buckets
        zero3 = 0
        if zero >= 3:
            for k in ("params_bytes", "lora_params_bytes", "quant_constants_bytes"):
                rows[k] = -(-rows[k] // gpus)
            zero3 = 2 * largest_layer
        trans = {"loss_backward_bytes": a["loss_backward_bytes"], "recompute_bytes": a["recompute_bytes"],
                 "autocast_cache_bytes": a["autocast_cache_bytes"], "zero3_gather_bytes": zero3,
                 "optimizer_step_bytes": -(-step_temp // (gpus if zero >= 1 else 1))}
        rows.update(trans)
        states_total = sum(rows[k] for k in STATE_ROWS)
        fwd = (rows["weight_copies_bytes"] + rows["activations_bytes"] + rows["logits_bytes"] + zero3
               + max(trans["loss_backward_bytes"], trans["recompute_bytes"], trans["autocast_cache_bytes"]))
        step = trans["optimizer_step_bytes"]
        # Gradients: the Trainer (sft, reward) and pretrain call zero_grad(set_to_none=True) after each step, so
        # with one micro-batch per step (grad_accum=1) no gradient exists during the forward; backward creates
        # them as it frees the activations, starting with the output head's at the peak. Accumulated
        # micro-batches, PPO's minibatches and DeepSpeed's ZeRO buffers keep them all the time, and so does an
        # estimate that is not told (grad_accum None).
        grads = rows["grads_bytes"]
        live = grads
        if grad_accum == 1 and stage != "ppo" and zero == 0:
            live = sh.vocab * sh.hidden * dtypes_for(regime, style, half, method, True, stage)["pdt"] \
                if (method == "full" and stage != "reward") else 0
            details["grads_at_peak_bytes"] = live
        phase = "forward/backward" if fwd + live >= grads + step else "optimizer step"
        total = states_total - grads + max(fwd + live, grads + step)
        if stage in ("ppo", "grpo"):
            details["rollout_total_bytes"] = states_total + details["rollout_kv_cache_bytes"]
            if details["rollout_total_bytes"] > total:
                total, phase = details["rollout_total_bytes"], "rollout generation"
        if grad_ckpt == "none":
            notes["recompute_bytes"] = ""
        if regime == "mixed" and style == "autocast":
            notes["params_bytes"] = ("fp32 weights (they are the master copy under autocast)" if method == "full" else
                                     f"frozen base weights in {dtype}")
        if method == "qlora":
            notes["params_bytes"] = "NF4-packed linear weights + unquantized embeddings, norms, head"
        if optimizer == "paged_adamw8bit":
            warnings.append("paged optimizer state lives in CUDA unified memory and can be evicted to CPU under pressure")
        if a["attn_s2"]:
            notes["activations_bytes"] += f" (incl. {fmt_bytes(a['attn_s2'])} of s x s attention matrices)"
            if attn == "sdpa":
                warnings.append("SDPA falls back to its math kernel here (fp32 with GQA on CUDA, or attention dropout "
                                "on CPU) and keeps s x s matrices")
        if stage == "sft":
            notes["loss_backward_bytes"] = ("transient: backward of TRL's fused LM head (fp32 grad of the hidden "
                                            "states, one 4096 x 32768 logits tile, chunk casts); sft keeps no logits")
        if stage == "dpo":
            warnings.append("dpo: chosen and rejected run in one forward, so activations are for 2 x batch")
        if stage == "grpo" and not absent_roles:
            warnings.append("grpo: counts a reference (none with kl_coef 0) and a reward model (none with --reward-fn)")
        if stage == "reward":
            notes["logits_bytes"] = "pooled reward scores held by the output"
            warnings.append("reward: chosen and rejected run in one forward, so activations are for 2 x batch")
    overhead = 0
    if device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_MARGIN * total)
    rows["overhead_bytes"] = overhead
    total += overhead
    for k in list(notes):
        if k not in rows:
            notes.pop(k)
    return Estimate(model=name, settings=settings, regime=_regime_label(regime, style, dtype, method), n_params=n_params,
                    n_trainable=n_train, rows=rows, notes=notes, total_bytes=int(total), peak_phase=phase,
                    details=details, roles=roles, warnings=warnings)


# ---------------------------------------------------------------------------
# 4. Closed forms from the literature (docs/memory.md; the tests hold the estimate to them)
# ---------------------------------------------------------------------------
def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, flash: bool = False) -> int:
    """Activations of one GPT layer in 16-bit with 1-byte dropout masks: s*b*h*(34 + 5*a*s/h).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", eq. 1 (no tensor/sequence parallelism). The 5*a*s/h term is the
    attention scores, softmax and dropout mask/output that SDPA/flash do not keep.
    """
    return s * b * h * 34 + (0 if flash else 5 * a * s * s * b)


def kv_cache_bytes(config: dict | Shape, batch: int, tokens: int, bytes_per: int = 2) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch elements."""
    sh = config if isinstance(config, Shape) else model_shape(config)
    return 2 * sh.layers * sh.kv_heads * sh.head_dim * tokens * batch * bytes_per


# ---------------------------------------------------------------------------
# 5. The check the stages call before training
# ---------------------------------------------------------------------------
def device_memory() -> int | None:
    """Usable bytes on the current CUDA device, or None without CUDA (CPU runs are never refused).

    Imports torch lazily: only the stages, which have it loaded already, call this.
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    # our own context already counts as used; the estimate includes it, so add it back
    return int(min(total, free + CUDA_CONTEXT_BYTES + torch.cuda.memory_reserved()))


def check_fits(model_config: dict, *, stage: str = "sft", method: str = "full", batch_size: int = 1,
               seq_len: int = 2048, device_bytes: int | None = None, force: bool = False, gpus: int = 1,
               echo=print, **kw: Any) -> Estimate | None:
    """Estimate, and refuse (UsageError) a run that will not fit the device unless `force`.

    `device_bytes=None` asks the CUDA device (device_memory); on CPU there is no
    verdict and no refusal. With `force` a run that does not fit prints one
    warning line instead. A model the estimator cannot model never stops a run:
    one warning line, and None. Other keyword arguments go to `estimate`.
    """
    if device_bytes is None:
        device_bytes = device_memory()
        if device_bytes is None:
            kw.setdefault("device", "cpu")
    try:
        est = estimate(model_config, stage=stage, method=method, batch_size=batch_size, seq_len=seq_len, gpus=gpus,
                       gpu_memory=device_bytes, **kw)
    except CannotEstimate as e:
        echo(f"warning: {e}; continuing")
        return None
    except UsageError as e:
        mt = model_config.get("model_type", "(none)") if isinstance(model_config, dict) else "(none)"
        echo(f"warning: cannot estimate memory for model_type {mt} ({e}); continuing")
        return None
    if device_bytes is None or est.fits:
        return est
    hint = (f"the largest micro-batch that fits is {est.max_batch_size} (use gradient accumulation for the rest)"
            if est.max_batch_size else
            "even batch 1 does not fit: try grad checkpointing, --method lora/qlora, a shorter sequence or more GPUs with ZeRO")
    msg = (f"{stage} needs about {fmt_bytes(est.total_bytes)} per GPU (batch {batch_size} x seq {seq_len}, {method}) "
           f"but the device has {fmt_bytes(device_bytes)}; {hint}")
    if not force:
        raise UsageError(msg + "; pass --force to try anyway")
    echo(f"warning: {msg}; continuing because of --force")
    return est


# ---------------------------------------------------------------------------
# 6. `llm estimate-memory`
# ---------------------------------------------------------------------------
def resolve(model: str, seq_len: int | None, gpu_memory: str | None) -> tuple[dict, str, Shape, int, int | None]:
    """--model, --seq-len and --gpu-memory as the command reads them: (config, label, shape, seq_len, bytes or None)."""
    config, name = load_model_config(model)
    sh = model_shape(config)
    if seq_len is None:
        seq_len = min(2048, sh.max_positions)
    try:
        limit = parse_size(gpu_memory) if gpu_memory is not None else None
    except UsageError as e:
        raise UsageError(f"--gpu-memory {gpu_memory}: {e}") from None
    return config, name, sh, seq_len, limit


def cli_estimate(*, model: str, stage: str = "sft", method: str = "full", lora_r: int = 8, dtype: str = "bf16",
                 precision: str | None = None, mp_style: str | None = None, optimizer: str = "adamw",
                 batch_size: int = 1, seq_len: int | None = None, grad_ckpt: str = "none", attn: str = "sdpa",
                 zero: int = 0, gpus: int = 1, gpu_memory: str | None = None, device: str = "cuda",
                 as_json: bool = False, echo=print, measure: bool = False) -> Estimate:
    """`llm estimate-memory`: read the model, estimate, print a table (or JSON).

    `measure` is accepted because the command's options include it, but one real
    step is lifecycle.memory_measure.cli_measure's job (cli.py dispatches it), so
    that this module never imports the torch side.
    """
    assert not measure, "--measure is dispatched by cli.py to lifecycle.memory_measure.cli_measure"
    config, name, sh, seq_len, limit = resolve(model, seq_len, gpu_memory)
    est = estimate(sh, stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision,
                   optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn,
                   zero=zero, gpus=gpus, device=device, mp_style=mp_style, gpu_memory=limit, name=name)
    echo(json.dumps(est.to_dict(), indent=2) if as_json else est.table())
    return est
