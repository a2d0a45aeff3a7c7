"""Model states: the bytes of weights, adapters, quantization constants, master copy, gradients and optimizer state.

No torch. `model_states` walks a parameter table (the closed form's, or one read
off a traced module) under a precision regime and a fine-tuning method;
`optimizer_state_bytes` is each optimizer's state per trainable tensor;
`zero_model_state_bytes` is the ZeRO paper's closed form the estimate is held to.
"""

from __future__ import annotations

from lifecycle.memory_arch import ParamSpec, Shape, dtypes_for, nf4_bytes

# bitsandbytes constants (bitsandbytes/optim/optimizer.py, functional.py)
BNB_8BIT_BLOCK = 256          # 8-bit optimizer states: one fp32 absmax per 256 elements
BNB_8BIT_MIN_SIZE = 4096      # tensors with fewer elements keep 32-bit states


def optimizer_state_bytes(specs: list[tuple[int, int, int, int]], optimizer: str, device: str) -> tuple[int, int]:
    """(state bytes, step temporaries) for trainable tensors given as (numel, rows, cols, state dtype bytes).

    adamw: exp_avg + exp_avg_sq (2 states); sgd: momentum buffer (1 state);
    adafactor (torch.optim.Adafactor): factored second moment, rows + cols for matrices;
    torch keeps states in the parameter's dtype. adamw8bit (bitsandbytes): two uint8
    states + one fp32 absmax per 256 elements each; tensors under 4096 elements keep
    fp32 states; the two 256-entry fp32 quantization maps are shared. torch optimizers
    also keep a 0-dim fp32 `step` tensor per parameter, on the CPU.
    """
    if not specs:
        return 0, 0
    step = 4 * len(specs) if (device == "cpu" and optimizer in ("adamw", "adafactor")) else 0
    largest = max(n * dt for n, _, _, dt in specs)
    total = sum(n * dt for n, _, _, dt in specs)
    if optimizer == "adamw":
        return 2 * total + step, (total if device == "cuda" else largest)   # foreach sqrt(exp_avg_sq) on CUDA
    if optimizer == "sgd":
        return total, 0
    if optimizer == "adafactor":
        st = sum(dt * ((r + c) if c > 1 else n) for n, r, c, dt in specs)
        return st + step, (total if device == "cuda" else largest)
    out, any8 = 0, False    # 8-bit, paged or not
    for n, _, _, _ in specs:
        if n >= BNB_8BIT_MIN_SIZE:
            any8 = True
            out += 2 * n + 2 * 4 * -(-n // BNB_8BIT_BLOCK)
        else:
            out += 2 * 4 * n
    return out + (2 * 256 * 4 if any8 else 0), 0


def model_states(sh: Shape, table: list[ParamSpec], generic_lora: list[ParamSpec], *, method: str, regime: str,
                 style: str, half: int, optimizer: str, lora_r: int, lora_roles: tuple, device: str, trains: bool,
                 stage: str = "sft") -> dict[str, int]:
    """Bytes of weights, adapters, quantization constants, master copy, grads and optimizer state."""
    d = dtypes_for(regime, style, half, method, trains, stage)
    pdt, qcompute, adt = d["pdt"], d["qcompute"], d["adt"]
    full = method == "full"
    quant = method == "qlora"
    rows = dict(params_bytes=0, lora_params_bytes=0, quant_constants_bytes=0, master_bytes=0, grads_bytes=0,
                optimizer_bytes=0, optimizer_step_bytes=0, n_params=0, n_trainable=0, largest_layer=0)
    trainable: list[tuple[int, int, int, int]] = []      # (numel, rows, cols, dtype bytes)
    layer_bytes: dict[int, int] = {}
    for p in table:
        rows["n_params"] += p.numel
        if quant and p.kind == "linear":
            packed, consts = nf4_bytes(p.numel)
            rows["quant_constants_bytes"] += consts
            b = packed
        elif quant and p.kind == "bias" and p.layer >= 0:
            b = p.numel * qcompute          # Linear4bit casts its bias to the compute dtype
        else:
            b = p.numel * pdt
        rows["params_bytes"] += b
        if p.layer >= 0:
            layer_bytes[p.layer] = layer_bytes.get(p.layer, 0) + b
        if trains and full:
            trainable.append((p.numel, p.rows, p.cols, pdt))
        elif trains and p.kind == "score":
            # peft modules_to_save: a trainable copy next to the original, in the adapters' dtype
            # (load_for_training makes it fp32 like them; TRL casts a quantized model's to bf16)
            rows["params_bytes"] += p.numel * adt
            trainable.append((p.numel, p.rows, p.cols, adt))
        if p.role in lora_roles and p.kind == "linear" and not full and sh.arch != "generic":
            fan_in, fan_out = (p.rows, p.cols) if sh.arch == "gpt2" else (p.cols, p.rows)   # Conv1D is (in, out)
            for n, r, c in ((fan_in * lora_r, lora_r, fan_in), (lora_r * fan_out, fan_out, lora_r)):
                rows["lora_params_bytes"] += n * adt
                rows["n_params"] += n
                if trains:
                    trainable.append((n, r, c, adt))
    for p in generic_lora:                       # the adapters peft puts on a traced module (experts included)
            rows["lora_params_bytes"] += p.numel * adt
            rows["n_params"] += p.numel
            if trains:
                trainable.append((p.numel, p.rows, p.cols, adt))
    rows["largest_layer"] = max(layer_bytes.values(), default=0)
    rows["n_trainable"] = sum(n for n, _, _, _ in trainable)
    rows["grads_bytes"] = sum(n * dt for n, _, _, dt in trainable)
    master = regime == "mixed" and style == "master"
    if master:
        rows["master_bytes"] = 4 * rows["n_trainable"]
        trainable = [(n, r, c, 4) for n, r, c, _ in trainable]   # states live next to the fp32 master copy
    rows["optimizer_bytes"], rows["optimizer_step_bytes"] = optimizer_state_bytes(trainable, optimizer, device)
    return rows


def zero_model_state_bytes(n_params: float, gpus: int, stage: int, k: int = 12) -> float:
    """Per-GPU model states under ZeRO with mixed-precision Adam (Rajbhandari et al. 2019, Fig. 1).

    2 bytes fp16 weights + 2 bytes fp16 grads + K=12 bytes optimizer state (fp32
    master, momentum, variance) per parameter; stage 1 shards the K part, stage 2
    also the grads, stage 3 also the weights over `gpus` data-parallel ranks.
    """
    psi = float(n_params)
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 4 * psi + k * psi / gpus
    if stage == 2:
        return 2 * psi + (2 + k) * psi / gpus
    return (2 + 2 + k) * psi / gpus
