"""Build models from presets or config files, and load artifacts.

Everything goes through stock `transformers` classes so that every artifact we
write is a plain Hugging Face directory: Llama-style (RMSNorm, RoPE, SwiGLU,
GQA) or GPT-2-style (LayerNorm, learned positions, GELU), SDPA attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lifecycle.errors import UsageError
from lifecycle.presets import PRESETS  # noqa: F401  architecture shapes; the vocabulary comes from the tokenizer


def model_config(spec: str, vocab_size: int, eos_id: int, pad_id: int):
    """A transformers config from a preset name or a config.json path (vocab set from the tokenizer)."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if spec in PRESETS:
        p = PRESETS[spec]
        if p["arch"] == "llama":
            return LlamaConfig(
                vocab_size=vocab_size, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], intermediate_size=p["mlp"],
                max_position_embeddings=p["max_pos"], tie_word_embeddings=p["tied"], rms_norm_eps=1e-5,
                bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
            )
        return GPT2Config(
            vocab_size=vocab_size, n_embd=p["hidden"], n_layer=p["layers"], n_head=p["heads"], n_inner=p["mlp"],
            n_positions=p["max_pos"], tie_word_embeddings=p["tied"], bos_token_id=eos_id, eos_token_id=eos_id,
            pad_token_id=pad_id,
            # the preset's dropout (0 for the gpt2-* presets, as nanoGPT and current pretraining recipes use)
            resid_pdrop=p.get("dropout", 0.1), embd_pdrop=p.get("dropout", 0.1), attn_pdrop=p.get("dropout", 0.1),
            activation_function=p.get("act", "gelu_new"),  # the gpt2-* presets: exact GELU (lifecycle/presets.py)
        )
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model {spec!r} is neither a preset nor a file; presets: {', '.join(PRESETS)}, or pass a config.json path")
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"model config {path} cannot be read as JSON ({e}); pass a transformers config.json") from None
    if "model_type" not in raw:
        raise UsageError(f"model config {path} has no model_type; expected a transformers config.json (e.g. model_type: llama)")
    raw.update(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id)
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"model config {path} is not valid ({e})") from None


def attention_for(config, head: str = "causal-lm") -> str:
    """SDPA where the architecture supports it, else transformers' eager attention.

    Some families cannot run SDPA (Gemma 2 soft-caps attention logits inside the
    softmax, which SDPA has no hook for); asking for it raises, so ask the class.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.auto_factory import _get_model_class

    auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    try:
        cls = _get_model_class(config, auto._model_mapping)
    except (KeyError, ValueError):
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _attention_for_path(path: str, head: str, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    try:
        return attention_for(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), head)
    except (OSError, ValueError):
        return "sdpa"


def is_moe(config) -> bool:
    """A mixture-of-experts model (Mixtral, Qwen3-MoE, OLMoE, ...): several experts per layer."""
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
    return bool(n and n > 1)


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def build_model(config):
    """A freshly initialised causal LM with SDPA attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(config))


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes 4-bit weights pack two values per byte.
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM artifact (directory or hub id) with SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=_attention_for_path(path, CAUSAL_HEAD, trust_remote_code),
        trust_remote_code=trust_remote_code,
    )


# ---------------------------------------------------------------------------
# Loading for fine-tuning: full, LoRA, QLoRA (4-bit base + LoRA), DoRA
# ---------------------------------------------------------------------------
# `peft` options are any object with the fields of config.PeftCommon (lora,
# qlora, dora, lora_r, lora_alpha, lora_dropout, lora_target_modules).
CAUSAL_HEAD, REWARD_HEAD = "causal-lm", "reward"


def lora_config(peft: Any, head: str = CAUSAL_HEAD, model_config: Any = None):
    """The peft LoraConfig for these options; `use_dora` turns LoRA into DoRA (Liu et al. 2024).

    With target "all-linear" peft adapts every linear layer except the output
    layer (lm_head, or the reward head `score`, which is trained in full via
    modules_to_save because it starts from random). On a mixture-of-experts
    model (transformers 5 fuses each layer's experts into 3-D weights) peft also
    adapts the router and the fused expert weights, wrapping them as parameters
    rather than modules. peft cannot apply dropout to
    parameter-wrapped weights, so there LoRA dropout is 0.
    """
    from peft import LoraConfig, TaskType

    targets = peft.lora_target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    moe = model_config is not None and is_moe(model_config)
    return LoraConfig(
        r=peft.lora_r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=0.0 if moe else peft.lora_dropout,
        target_modules=targets,
        use_dora=peft.dora,
        bias="none",
        task_type=TaskType.SEQ_CLS if head == REWARD_HEAD else TaskType.CAUSAL_LM,
    )


def quantization_config(compute_dtype: str = "bfloat16"):
    """QLoRA's 4-bit storage (Dettmers et al. 2023): NF4 weights, double-quantized scales, bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def _from_pretrained(path: str, head: str, **kw):
    """AutoModelForCausalLM, or a one-label AutoModelForSequenceClassification on the same backbone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kw.setdefault("attn_implementation", _attention_for_path(path, head, kw.get("trust_remote_code", False)))
    if head == CAUSAL_HEAD:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    # A causal LM's checkpoint has no `score` weights (they start random) and an
    # lm_head that the classifier does not use: the load report says so; hush it.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    finally:
        hf_logging.set_verbosity(level)


def _disable_cpu_packed_4bit(model) -> None:
    """Keep bitsandbytes on its generic 4-bit path on CPU. In eval mode it would
    repack the weights for an inference kernel that needs every input width to be
    a multiple of the 64-value block (small models are not) and leaves them
    repacked when training resumes."""
    for m in model.modules():
        if m.__class__.__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = False


def load_for_training(path: str, peft: Any, *, head: str = CAUSAL_HEAD, pad_token_id: int | None = None,
                      gradient_checkpointing: bool = False, trust_remote_code: bool = False):
    """Load `path` for fine-tuning: all weights trainable, or a peft model with LoRA/DoRA adapters.

    QLoRA loads the frozen base in 4-bit NF4 and runs peft's
    prepare_model_for_kbit_training (fp32 norms and embeddings, input grads for
    checkpointing) before adding the adapters. `head="reward"` builds a
    one-label sequence classifier on the causal LM's backbone.
    """
    import torch

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if peft.qlora:
        kw["quantization_config"] = quantization_config()
        kw["dtype"] = torch.bfloat16
        if torch.cuda.is_available():  # the Trainer cannot move a 4-bit model: load it on this process's GPU
            from accelerate import PartialState

            kw["device_map"] = {"": PartialState().local_process_index}
    elif (peft.lora or peft.dora) and getattr(peft, "mixed_precision", "no") in ("bf16", "fp16"):
        # LoRA under 16-bit autocast: the frozen base is only ever read in 16 bits, so store it so (half
        # the memory, what the estimator counts); peft keeps the adapters themselves in fp32.
        kw["dtype"] = torch.bfloat16 if peft.mixed_precision == "bf16" else torch.float16
    else:
        kw["dtype"] = torch.float32
    model = _from_pretrained(path, head, **kw)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # sequence classifiers find the last token through it
    if peft.qlora:
        from peft import prepare_model_for_kbit_training

        _disable_cpu_packed_4bit(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if peft.lora or peft.qlora or peft.dora:
        from peft import get_peft_model

        if peft.dora and is_moe(model.config):
            raise UsageError(f"--dora on {path}: peft cannot apply DoRA to a mixture of experts' fused expert weights; "
                             f"use --lora or --qlora for this model")

        if is_moe(model.config) and peft.lora_dropout:
            print(f"note: lora_dropout {peft.lora_dropout} -> 0 on this mixture-of-experts model "
                  f"(peft adapts the fused expert weights as parameters, which takes no dropout)", flush=True)
        model = get_peft_model(model, lora_config(peft, head, model.config))
        if not peft.qlora and kw["dtype"] != torch.float32:
            for p in model.parameters():  # the trained copy of a reward head too: fp32, as the adapters
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
    return model


def describe_trainable(model) -> str:
    """'trainable 12,288 of 868,480 parameters (1.41%)', 4-bit weights counted at their logical size."""
    trainable, total = count_params(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def merge_adapter(base: str, adapter_dir: str, *, head: str = CAUSAL_HEAD, pad_token_id: int | None = None,
                  trust_remote_code: bool = False):
    """A plain full model: the unquantized base (in its stored dtype) with the adapter merged into its weights.

    For QLoRA this merges onto the original full-precision base weights, not the
    4-bit copy the adapter was trained against; the difference is the 4-bit
    rounding error, which the adapter never saw anyway.
    """
    from peft import PeftModel

    model = _from_pretrained(base, head, dtype="auto", trust_remote_code=trust_remote_code)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
