"""`llm estimate-memory --measure`: one real training step, counted byte by byte.

Builds the model as the stage does (random weights from the config, read back
through lifecycle.modeling.load_for_training: LoRA with peft, NF4 QLoRA with
bitsandbytes, which runs on CPU too; sft with TRL's fused LM head), runs one
forward (sft: SFTTrainer's loss), backward and optimizer step, and counts:

  params / LoRA / quantization constants: the parameter storages and the NF4 quant_state tensors
  grads:       the .grad storages after backward
  optimizer:   every tensor in optimizer.state after step() (shared ones once)
  saved:       every tensor autograd saves for backward, caught with
               torch.autograd.graph.saved_tensors_hooks and counted once per
               storage (untyped_storage().data_ptr()), parameters excluded; then
               split into 16-bit weight copies (a storage equal to a parameter
               cast to 16-bit), logits (last dim = vocab; plus the logits the
               output holds) and activations (the rest)
  on CUDA also torch.cuda.max_memory_allocated() over the whole step.

`compare(estimate, measured)` lines the rows up with the error in percent. The
estimate for the comparison uses the device the step ran on (CPU rules differ:
dropout masks in the input dtype, SDPA falling back to its math kernel with dropout).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import torch

from lifecycle import memory
from lifecycle.errors import UsageError
from lifecycle.memory_trace import hf_config

TORCH_DTYPES = {2: torch.bfloat16, 4: torch.float32}
LORA_MODULES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"},
    "gpt2": {"attn": "c_attn", "proj": "c_proj", "fc": "c_fc", "fc_proj": "c_proj"},
}
COMPARED = ("params_bytes", "lora_params_bytes", "quant_constants_bytes", "grads_bytes", "optimizer_bytes",
            "weight_copies_bytes", "activations_bytes", "logits_bytes")


def build(config: dict, *, stage: str, method: str, lora_r: int, dtype: str, precision: str | None, attn: str,
          grad_ckpt: str, device: str, lora_dropout: float = 0.0, lora_targets=None, seed: int = 0):
    """The model as the stage builds it: returns (model, autocast dtype or None).

    Random weights from the config are written to a temporary directory and read
    back through the stages' own loader, `lifecycle.modeling.load_for_training`
    (fp32 for full fine-tuning, a 16-bit frozen base under 16-bit autocast, 4-bit
    NF4 with peft's prepare_model_for_kbit_training for QLoRA); then what the
    stage's trainer does to it: TRL casts a quantized model's trainable tensors to
    bf16, sft patches in TRL's fused LM head, gradient checkpointing as the
    Trainer turns it on. `precision="pure"` (no stage runs it) casts the loaded
    model's non-adapter weights to 16-bit afterwards.
    """
    import types
    import warnings

    import transformers
    from transformers import AutoModelForCausalLM

    from lifecycle.memory_trace import add_trl_fused_head
    from lifecycle.modeling import CAUSAL_HEAD, REWARD_HEAD, load_for_training

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # peft on GPT-2's Conv1D: handled, not a problem
    regime, style = memory.regime_of(dtype, precision)
    if regime == "mixed" and style == "master":
        raise UsageError("--measure runs plain PyTorch; the fp32-master-copy layout is DeepSpeed's (drop --mp-style master)")
    half = memory.DTYPES[dtype]
    dts = memory.dtypes_for(regime, style, half, method, True, stage)
    half_t = torch.float16 if dtype == "fp16" else torch.bfloat16
    sh = memory.model_shape(config)
    conf = hf_config(config, attn="eager", head="lm")
    if not getattr(AutoModelForCausalLM._model_mapping[type(conf)], "_supports_sdpa", True):
        attn = "eager"                      # as the estimate traces it (e.g. Gemma 2 has no SDPA)
    conf._attn_implementation = attn
    if sh.arch == "generic" or not lora_targets:
        targets = "all-linear"
    else:
        roles = tuple(r for r in memory.LORA_ROLES[sh.arch] if r in lora_targets)
        targets = ",".join(sorted({LORA_MODULES[sh.arch][r] for r in roles}))
    opts = types.SimpleNamespace(lora=method == "lora", qlora=method == "qlora", dora=False, lora_r=lora_r,
                                 lora_alpha=2 * lora_r, lora_dropout=lora_dropout, lora_target_modules=targets,
                                 mixed_precision={2: "bf16" if dtype == "bf16" else "fp16"}.get(half, "no")
                                 if regime == "mixed" else "no")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(conf).save_pretrained(tmp)
        model = load_for_training(tmp, opts, head=REWARD_HEAD if stage == "reward" else CAUSAL_HEAD,
                                  pad_token_id=sh.vocab - 1 if stage == "reward" else None,
                                  gradient_checkpointing=grad_ckpt == "full")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(attn)
    if method != "qlora":
        model.to(device)
    if regime == "pure":
        for n, p in model.named_parameters():
            if "lora_" not in n and p.is_floating_point():
                p.data = p.data.to(half_t)
    if method == "qlora" and dts["adt"] == 2:   # SFTTrainer / RewardTrainer on a quantized model
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if grad_ckpt == "full":
        model.gradient_checkpointing_enable()
        if method != "full":
            model.enable_input_require_grads()
    if stage == "sft":
        add_trl_fused_head(base)
    model.train()
    return model, (half_t if dts["autocast"] else None)


def _optimizer(name: str, params: list, device: str):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-5)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if (name == "paged_adamw8bit" and device == "cuda") else bnb.optim.AdamW8bit
    return cls(params, lr=1e-5)


def _storage_key(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return (st.device.type, st.data_ptr())


def _tensors_in(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def measure(config: dict, *, stage: str = "sft", method: str = "full", lora_r: int = 8, dtype: str = "bf16",
            precision: str | None = None, optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 64,
            grad_ckpt: str = "none", attn: str = "sdpa", lora_dropout: float = 0.0, lora_targets=None,
            device: str | None = None, seed: int = 0) -> dict:
    """Run one training step and return measured bytes per row (plus `device`, `saved` details)."""
    if stage not in ("pretrain", "sft", "reward"):
        raise UsageError(f"--measure runs one training step of one model; --stage {stage} is estimate-only "
                         f"(use pretrain, sft or reward)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sh = memory.model_shape(config)
    model, ac_dtype = build(config, stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision,
                            attn=attn, grad_ckpt=grad_ckpt, device=device, lora_dropout=lora_dropout,
                            lora_targets=lora_targets, seed=seed)
    named = list(model.named_parameters())
    trainable = [p for _, p in named if p.requires_grad]
    opt = _optimizer(optimizer, trainable, device)
    param_keys = {_storage_key(p) for _, p in named}
    b = batch_size * (2 if stage == "reward" else 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sh.vocab - 1, (b, seq_len), generator=g).to(device)
    if stage == "reward":
        batch = dict(input_ids=ids)
    else:
        batch = dict(input_ids=ids, labels=ids)

    saved: dict[tuple, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys and key not in saved:
            saved[key] = t
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ctx = torch.autocast(device, dtype=ac_dtype) if ac_dtype is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with ctx:
            if stage == "sft":   # SFTTrainer.compute_loss through the fused head: no logits
                out = model(**batch, fused_lm_head=True)
                loss = (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
            else:
                out = model(**batch)
                loss = out.loss if stage != "reward" else out.logits.float().mean()

    # ---- classify the saved storages ----
    casts: dict[int, list[torch.Tensor]] = {}
    for _, p in named:
        if p.dtype == torch.float32 and p.numel() > 0:
            casts.setdefault(p.numel() * 2, []).append(p)
    rows = dict(weight_copies_bytes=0, activations_bytes=0, logits_bytes=0)
    listing = []
    logits = getattr(out, "logits", None)
    logits_key = _storage_key(logits) if logits is not None else None
    for key, t in saved.items():
        nbytes = t.untyped_storage().nbytes()
        kind = "logits_bytes" if key == logits_key else "activations_bytes"
        if t.dtype in (torch.bfloat16, torch.float16) and nbytes in casts:
            flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
            for p in casts[nbytes]:
                if torch.equal(flat, p.detach().reshape(-1).to(t.dtype)):
                    kind = "weight_copies_bytes"
                    break
        if kind == "activations_bytes" and t.dim() >= 1 and t.shape[-1] == sh.vocab and t.is_floating_point():
            kind = "logits_bytes"
        rows[kind] += nbytes
        listing.append((nbytes, tuple(t.shape), str(t.dtype).replace("torch.", ""), kind))
    if logits is not None and logits_key not in saved:  # held by the output object, not saved: alive until the step ends
        rows["logits_bytes"] += logits.untyped_storage().nbytes()

    loss.backward()
    grads, seen = 0, set()
    for p in trainable:
        if p.grad is not None and _storage_key(p.grad) not in seen:
            seen.add(_storage_key(p.grad))
            grads += p.grad.untyped_storage().nbytes()
    opt.step()
    opt_bytes, seen = 0, set()
    for st in opt.state.values():
        for t in _tensors_in(st):
            k = _storage_key(t)
            if k not in seen:
                seen.add(k)
                opt_bytes += t.untyped_storage().nbytes()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None

    # ---- parameters (after the step: bitsandbytes casts 4-bit layers' biases on first use) ----
    params = lora = consts = 0
    seen = set()
    for n, p in named:
        k = _storage_key(p)
        if k in seen:
            continue
        seen.add(k)
        if "lora_" in n:
            lora += p.untyped_storage().nbytes()
        else:
            params += p.untyped_storage().nbytes()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code, qs.offset]
            if getattr(qs, "state2", None) is not None:
                parts += [qs.state2.absmax, qs.state2.code]
            for t in parts:
                if torch.is_tensor(t) and _storage_key(t) not in seen:
                    seen.add(_storage_key(t))
                    consts += t.untyped_storage().nbytes()
    rows.update(params_bytes=params, lora_params_bytes=lora, quant_constants_bytes=consts, grads_bytes=grads,
                optimizer_bytes=opt_bytes)
    return dict(rows=rows, device=device, peak_allocated_bytes=peak, saved=sorted(listing, reverse=True),
                n_trainable=sum(p.numel() for p in trainable), n_params=sum(p.numel() for _, p in named))


_one_step = measure   # cli_measure's own `measure` flag (the command's option) shadows the name


def compare(est: "memory.Estimate", meas: dict) -> list[tuple[str, int, int, float | None]]:
    """(row, estimated, measured, error %) for every row either side has."""
    out = []
    for k in COMPARED:
        e, m = int(est.rows.get(k, 0)), int(meas["rows"].get(k, 0))
        if e or m:
            out.append((k, e, m, None if m == 0 else 100.0 * (e - m) / m))
    if meas.get("peak_allocated_bytes"):
        e = est.total_bytes - est.rows.get("overhead_bytes", 0)
        m = meas["peak_allocated_bytes"]
        out.append(("peak (max_memory_allocated)", e, m, 100.0 * (e - m) / m))
    return out


def _ram_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cli_measure(*, model: str, stage: str = "sft", method: str = "full", lora_r: int = 8, dtype: str = "bf16",
                precision: str | None = None, mp_style: str | None = None, optimizer: str = "adamw",
                batch_size: int = 1, seq_len: int | None = None, grad_ckpt: str = "none", attn: str = "sdpa",
                zero: int = 0, gpus: int = 1, gpu_memory: str | None = None, device: str = "cuda",
                as_json: bool = False, echo=print, measure: bool = True) -> None:
    """`llm estimate-memory --measure`: validate, estimate for the device at hand, refuse what will not fit it,
    build the model, run one real step and print estimated vs measured per row.

    `gpu_memory` and `device` are the estimate's options; the measured step runs on
    this machine's device (CUDA if present, else CPU), and so does the estimate it is compared with.
    """
    if zero or gpus != 1 or mp_style == "master":
        raise UsageError("--measure runs one step on this machine's single device; drop --zero/--gpus/--mp-style master")
    if stage not in ("pretrain", "sft", "reward"):
        raise UsageError(f"--measure runs one training step of one model; --stage {stage} is estimate-only "
                         f"(use pretrain, sft or reward)")
    config, name, sh, seq_len, _ = memory.resolve(model, seq_len, gpu_memory)
    memory.validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len,
                    lora_r, device, mp_style)
    kw = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision, optimizer=optimizer,
              batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn)
    run_on = "cuda" if torch.cuda.is_available() else "cpu"
    est = memory.estimate(config, device=run_on, name=name, **kw)
    have = torch.cuda.mem_get_info()[0] if run_on == "cuda" else _ram_available()
    if have and est.total_bytes > 0.8 * have:
        raise UsageError(f"--measure would need about {memory.fmt_bytes(est.total_bytes)} on this {run_on} but only "
                         f"{memory.fmt_bytes(have)} is free; measure a smaller model (a tiny config.json), a shorter "
                         f"--seq-len or a smaller --batch-size")
    meas = _one_step(config, device=run_on, **kw)
    rows = compare(est, meas)
    if as_json:
        import json

        echo(json.dumps({"estimate": est.to_dict(), "measured": meas["rows"], "device": run_on,
                         "peak_allocated_bytes": meas["peak_allocated_bytes"],
                         "comparison": [dict(row=r, estimated=e, measured=m, error_pct=err) for r, e, m, err in rows]},
                        indent=2))
        return None
    st = est.settings
    echo(f"{name}: one {st['stage']} step on {run_on}, {st['method']}, {est.regime}, {st['optimizer']}, "
         f"batch {st['batch_size']} x seq {st['seq_len']}, {st['attn']}, grad ckpt {st['grad_ckpt']}")
    w = max(len(r[0]) for r in rows) + 2
    echo(f"{'row':<{w}}{'estimated':>12}{'measured':>12}{'error':>9}")
    for r, e, m, err in rows:
        echo(f"{r:<{w}}{memory.fmt_bytes(e):>12}{memory.fmt_bytes(m):>12}{'' if err is None else f'{err:+.1f}%':>9}")
    if run_on == "cpu":
        echo("(CPU: rows counted exactly from tensors; on CUDA the peak from max_memory_allocated is compared too)")
    return None
