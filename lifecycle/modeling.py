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

# Architecture shapes only; the vocabulary comes from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # The built-in world's model: 0.86M parameters, trains in minutes on 2 CPU cores.
    "llama-tiny": dict(arch="llama", hidden=128, layers=4, heads=4, kv_heads=4, mlp=384, max_pos=256, tied=True),
    "gpt2-tiny": dict(arch="gpt2", hidden=128, layers=4, heads=4, mlp=512, max_pos=256, tied=True),
    # Test-sized.
    "llama-micro": dict(arch="llama", hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, max_pos=128, tied=True),
    "gpt2-micro": dict(arch="gpt2", hidden=32, layers=2, heads=4, mlp=128, max_pos=128, tied=True),
    # GPU-sized recipes.
    "gpt2-124m": dict(arch="gpt2", hidden=768, layers=12, heads=12, mlp=3072, max_pos=1024, tied=True),
    "llama-100m": dict(arch="llama", hidden=768, layers=12, heads=12, kv_heads=4, mlp=2048, max_pos=2048, tied=True),
}


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


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def build_model(config):
    """A freshly initialised causal LM with SDPA attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


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
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
