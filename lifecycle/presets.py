"""Model shapes by name, and reading model configs from files: no torch (shared by modeling and memory).

Two tables:

  PRESETS    the project's own build presets (llama-tiny, gpt2-124m, ...) in a short
             schema (arch, hidden, layers, heads, kv_heads, mlp, max_pos, tied); the
             vocabulary comes from the tokenizer. `lifecycle.modeling` builds them.
  PUBLISHED  published models' architectures as they appear in their config.json on
             the Hub (architecture fields only: no weights, nothing downloaded).
             `llm estimate-memory --model qwen3-8b` reads them; tests/test_presets.py
             checks each one's parameter count against the figure its authors published.

`load_model_config(spec)` turns --model (an artifact directory, a config.json or a
preset name) into a config dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lifecycle.errors import UsageError

# ---------------------------------------------------------------------------
# The project's build presets (the vocabulary comes from the tokenizer)
# ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # The built-in world's model: 0.86M parameters, trains in minutes on 2 CPU cores.
    "llama-tiny": dict(arch="llama", hidden=128, layers=4, heads=4, kv_heads=4, mlp=384, max_pos=256, tied=True),
    # The gpt2-* presets train without dropout, as modern pretraining recipes (nanoGPT's included) do;
    # transformers' GPT2Config default would be 0.1 on residuals, embeddings and attention. Their MLP uses
    # torch's one-kernel exact GELU (act="gelu", as nanoGPT's nn.GELU) rather than GPT2Config's default
    # "gelu_new", the tanh formula written as six element-wise ops: 1.18x tokens/s on the GPT-2 shape on a CPU.
    "gpt2-tiny": dict(arch="gpt2", hidden=128, layers=4, heads=4, mlp=512, max_pos=256, tied=True, dropout=0.0, act="gelu"),
    # Test-sized.
    "llama-micro": dict(arch="llama", hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, max_pos=128, tied=True),
    "gpt2-micro": dict(arch="gpt2", hidden=32, layers=2, heads=4, mlp=128, max_pos=128, tied=True, dropout=0.0, act="gelu"),
    # GPU-sized recipes.
    "gpt2-124m": dict(arch="gpt2", hidden=768, layers=12, heads=12, mlp=3072, max_pos=1024, tied=True, dropout=0.0, act="gelu"),
    "llama-100m": dict(arch="llama", hidden=768, layers=12, heads=12, kv_heads=4, mlp=2048, max_pos=2048, tied=True),
}
PROJECT_VOCAB = 512  # what the memory estimate assumes for a project preset; PretrainConfig.vocab_size


def project_config(p: dict) -> dict:
    """A project preset (PRESETS schema) as a transformers-style config dict with the default vocabulary."""
    vocab = int(p.get("vocab", p.get("vocab_size", PROJECT_VOCAB)))
    if p.get("arch", "llama") == "gpt2":
        return dict(model_type="gpt2", n_embd=p["hidden"], n_layer=p["layers"], n_head=p["heads"],
                    n_inner=p.get("mlp"), n_positions=p.get("max_pos", 1024), vocab_size=vocab,
                    tie_word_embeddings=p.get("tied", True),
                    resid_pdrop=p.get("dropout", 0.1), embd_pdrop=p.get("dropout", 0.1), attn_pdrop=p.get("dropout", 0.1),
                    activation_function=p.get("act", "gelu_new"))
    return dict(model_type="llama", hidden_size=p["hidden"], intermediate_size=p["mlp"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p.get("kv_heads", p["heads"]),
                max_position_embeddings=p.get("max_pos", 2048), vocab_size=vocab, tie_word_embeddings=p.get("tied", False))


# ---------------------------------------------------------------------------
# Published architectures (config.json fields as on the Hub)
# ---------------------------------------------------------------------------
def _llama(h, layers, heads, kv, mlp, vocab, tied, max_pos, mt="llama", **kw) -> dict:
    return dict(model_type=mt, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=tied, **kw)


def _qwen3(h, layers, heads, kv, mlp, tied) -> dict:
    return _llama(h, layers, heads, kv, mlp, 151936, tied, 40960, mt="qwen3", head_dim=128, rms_norm_eps=1e-6)


def _gemma2(h, layers, heads, kv, mlp) -> dict:
    return _llama(h, layers, heads, kv, mlp, 256000, True, 8192, mt="gemma2", head_dim=256, sliding_window=4096,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
                  hidden_activation="gelu_pytorch_tanh")


def _gemma3(h, layers, heads, kv, mlp, vocab, window) -> dict:
    return _llama(h, layers, heads, kv, mlp, vocab, True, 131072 if h > 1152 else 32768, mt="gemma3_text", head_dim=256,
                  sliding_window=window, sliding_window_pattern=6, query_pre_attn_scalar=256,
                  hidden_activation="gelu_pytorch_tanh")


PUBLISHED: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 32, 32, 32, 11008, 32000, False, 4096),
    "llama-2-13b": _llama(5120, 40, 40, 40, 13824, 32000, False, 4096),
    "llama-2-70b": _llama(8192, 80, 64, 8, 28672, 32000, False, 4096),
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, False, 8192),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, False, 131072),
    "llama-3.1-70b": _llama(8192, 80, 64, 8, 28672, 128256, False, 131072),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, 131072, head_dim=64),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, True, 131072, head_dim=128),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32000, False, 32768, mt="mistral"),
    "mixtral-8x7b": _llama(4096, 32, 32, 8, 14336, 32000, False, 32768, mt="mixtral", num_local_experts=8,
                           num_experts_per_tok=2),
    "qwen2.5-0.5b": _llama(896, 24, 14, 2, 4864, 151936, True, 32768, mt="qwen2"),
    "qwen2.5-7b": _llama(3584, 28, 28, 4, 18944, 152064, False, 131072, mt="qwen2"),
    "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 8, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 8, 9728, True),
    "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288, False),
    "qwen3-14b": _qwen3(5120, 40, 40, 8, 17408, False),
    "qwen3-32b": _qwen3(5120, 64, 64, 8, 25600, False),
    "qwen3-30b-a3b": _llama(2048, 48, 32, 4, 6144, 151936, False, 40960, mt="qwen3_moe", head_dim=128,
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True, rms_norm_eps=1e-6),
    "gemma-2-2b": _gemma2(2304, 26, 8, 4, 9216),
    "gemma-2-9b": _gemma2(3584, 42, 16, 8, 14336),
    "gemma-3-1b": _gemma3(1152, 26, 4, 1, 6912, 262144, 512),
    "gemma-3-4b": _gemma3(2560, 34, 8, 4, 10240, 262208, 1024),
    "gemma-3-12b": _gemma3(3840, 48, 16, 8, 15360, 262208, 1024),
    "phi-3-mini": _llama(3072, 32, 32, 32, 8192, 32064, False, 4096, mt="phi3", pad_token_id=32000),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, True, 8192),
    "smollm2-360m": _llama(960, 32, 15, 5, 2560, 49152, True, 8192),
    "smollm2-1.7b": _llama(2048, 24, 32, 32, 8192, 49152, True, 8192),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
}
ALIASES = {
    "llama2-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "llama2-70b": "llama-2-70b", "llama2-13b": "llama-2-13b",
    "llama3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b", "llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama-3.1-8b": "llama-3.1-8b", "meta-llama-3.1-70b": "llama-3.1-70b", "llama-3.2-1b-instruct": "llama-3.2-1b",
    "llama-3.2-3b-instruct": "llama-3.2-3b", "mistral-7b-v0.1": "mistral-7b", "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-7b-instruct": "qwen2.5-7b", "qwen3-30b": "qwen3-30b-a3b",
    "gemma-2-2b-it": "gemma-2-2b", "gemma-2-9b-it": "gemma-2-9b", "gemma-3-1b-it": "gemma-3-1b",
    "gemma-3-4b-it": "gemma-3-4b", "gemma-3-12b-it": "gemma-3-12b", "phi-3-mini-4k-instruct": "phi-3-mini",
    "phi3-mini": "phi-3-mini", "smollm2-135m-instruct": "smollm2-135m", "smollm2-360m-instruct": "smollm2-360m",
    "smollm2-1.7b-instruct": "smollm2-1.7b", "gpt2-124m": "gpt2", "gpt-2": "gpt2", "gpt2-small": "gpt2",
    "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large", "gpt2-1.5b": "gpt2-xl", "gpt2-1558m": "gpt2-xl",
}
# Exact parameter counts (HF `num_parameters()` of these configs), checked by tests/test_memory.py.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def norm_name(name: str) -> str:
    """'Qwen/Qwen3-8B' -> 'qwen3-8b': hub ids and case do not matter."""
    return name.strip().lower().replace("_", "-").split("/")[-1]


def preset_names() -> list[str]:
    return sorted(set(PUBLISHED) | set(PRESETS))


def read_json(path: Path) -> dict:
    """A config file as a dict, or one UsageError line saying what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); pass a transformers config.json") from None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); pass a readable config.json") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object (a transformers config), found {type(data).__name__}")
    return data


def load_model_config(spec: str) -> tuple[dict, str]:
    """--model: an artifact directory, a config.json path, or a preset name -> (config dict, label)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            present = ", ".join(sorted(os.listdir(p))[:8]) or "nothing"
            raise UsageError(f"--model {spec} is a directory without config.json (found: {present}); "
                             f"pass a model artifact directory, a config.json, or a preset ({', '.join(preset_names())})")
        return read_json(cfg_path), str(p)
    if p.is_file():
        return read_json(p), str(p)
    key = norm_name(spec)
    key = ALIASES.get(key, key)
    if key in PUBLISHED:
        return json.loads(json.dumps(PUBLISHED[key])), key       # a deep copy: callers may edit it
    if key in PRESETS:
        return project_config(PRESETS[key]), f"{key} (vocab {PRESETS[key].get('vocab', PROJECT_VOCAB)})"
    if spec.endswith(".json") or "/" in spec or spec.startswith("."):
        raise UsageError(f"--model {spec} does not exist; pass an artifact directory, a config.json, or a preset "
                         f"({', '.join(preset_names())})")
    raise UsageError(f"unknown model preset {spec!r}; known presets: {', '.join(preset_names())} "
                     f"(or pass an artifact directory or a config.json)")
