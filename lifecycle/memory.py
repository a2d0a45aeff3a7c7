"""Training-memory estimator: pure arithmetic, no torch import (not even indirectly).

`estimate(config, stage=..., method=..., ...)` predicts, per GPU, the bytes a
training step holds at its peak, split into rows (parameters, gradients,
optimizer state, fp32 master copy, 16-bit weight copies, activations, logits,
quantization constants, LoRA weights, transients, CUDA overhead). The stages
call `check_fits(...)` before loading weights; `llm estimate-memory` prints the
same estimate; `llm estimate-memory --measure` (lifecycle/memory_measure.py)
runs one real step and compares row by row.

How the activations are counted
-------------------------------
Closed forms such as Korthikanti et al. (2022) count what an idealised GPT
layer keeps for backward. Hugging Face models keep more (every nn.Linear under
autocast saves its own 16-bit cast of its input, GELU-tanh keeps four
intermediates, RMSNorm keeps fp32 copies, the residual stream stays fp32 under
autocast, ...). So instead of a fixed per-layer constant, `_Graph` walks the
forward pass of transformers' LlamaForCausalLM / GPT2LMHeadModel op by op with
symbolic tensors and applies PyTorch's rules for what each op saves for
backward (only what the gradient of an input that requires grad needs), the
autocast casting rules (which ops run in 16-bit, which in fp32, which casts
are cached) and storage sharing (views and tensors saved by two ops count
once). The rules were read off `torch.autograd.graph.saved_tensors_hooks` on
transformers 5.23 / torch 2.13 and are checked against measurement by
tests/test_memory.py. docs/memory.md writes the result out as formulas.

Everything here is plain Python on ints: `llm estimate-memory` answers in well
under a second.
"""

from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lifecycle.errors import UsageError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

STAGES = ("pretrain", "sft", "reward", "ppo", "inference")
METHODS = ("full", "lora", "qlora")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
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

# bitsandbytes constants (bitsandbytes/optim/optimizer.py, functional.py)
BNB_8BIT_BLOCK = 256          # 8-bit optimizer states: one fp32 absmax per 256 elements
BNB_8BIT_MIN_SIZE = 4096      # tensors with fewer elements keep 32-bit states
NF4_BLOCK = 64                # NF4: one absmax per 64 weights
NF4_DQ_BLOCK = 256            # double quantization: one fp32 absmax per 256 absmax blocks


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
# 2. Model shapes: presets, config.json, artifact directories
# ---------------------------------------------------------------------------
# Published configs (architecture fields only), as in each model's config.json on the Hub.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
}
ALIASES = {
    "llama2-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "llama2-70b": "llama-2-70b", "llama2-13b": "llama-2-13b",
    "llama-3-8b": "llama-3-8b", "llama3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b",
    "mistral-7b-v0.1": "mistral-7b", "qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-7b-instruct": "qwen2.5-7b",
    "gpt2-124m": "gpt2", "gpt-2": "gpt2", "gpt2-small": "gpt2", "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large",
    "gpt2-1.5b": "gpt2-xl", "gpt2-1558m": "gpt2-xl",
}
# Published parameter counts (the model cards / HF `num_parameters()`), checked by the tests.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def _literal(node: ast.AST) -> Any:
    """literal_eval that also accepts dict(key=literal, ...) calls: nothing is executed."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(k.arg is None for k in node.keywords):
            raise ValueError("dict(**...)")
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("{**...}")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _project_presets() -> dict[str, dict]:
    """The project's own presets: the literal `PRESETS = {...}` dict in lifecycle/modeling.py.

    modeling.py imports torch, so it is read with `ast`, never imported: the
    shape numbers stay in one place and this module stays torch-free.
    """
    path = Path(__file__).with_name("modeling.py")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets) and node.value is not None:
            try:
                value = _literal(node.value)
            except ValueError:
                return {}
            if isinstance(value, dict):
                return {str(k).lower(): dict(v) for k, v in value.items() if isinstance(v, dict)}
    return {}


PROJECT_VOCAB = 512  # the project's presets take their vocabulary from the tokenizer; PretrainConfig.vocab_size


def _from_project_preset(p: dict) -> dict:
    """modeling.py's preset schema (arch, hidden, layers, heads, kv_heads, mlp, max_pos, tied) as a config dict."""
    vocab = int(p.get("vocab", p.get("vocab_size", PROJECT_VOCAB)))
    if p.get("arch", "llama") == "gpt2":
        return dict(model_type="gpt2", n_embd=p["hidden"], n_layer=p["layers"], n_head=p["heads"],
                    n_inner=p.get("mlp"), n_positions=p.get("max_pos", 1024), vocab_size=vocab,
                    tie_word_embeddings=p.get("tied", True))
    return dict(model_type="llama", hidden_size=p["hidden"], intermediate_size=p["mlp"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p.get("kv_heads", p["heads"]),
                max_position_embeddings=p.get("max_pos", 2048), vocab_size=vocab, tie_word_embeddings=p.get("tied", False))


def preset_names() -> list[str]:
    return sorted(set(PRESETS) | set(_project_presets()))


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("_", "-").split("/")[-1]


def load_model_config(spec: str) -> tuple[dict, str]:
    """--model: an artifact directory, a config.json path, or a preset name -> (config dict, label)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            present = ", ".join(sorted(os.listdir(p))[:8]) or "nothing"
            raise UsageError(f"--model {spec} is a directory without config.json (found: {present}); "
                             f"pass a model artifact directory, a config.json, or a preset ({', '.join(preset_names())})")
        return _read_json(cfg_path), str(p)
    if p.is_file():
        return _read_json(p), str(p)
    key = _norm_name(spec)
    key = ALIASES.get(key, key)
    project = _project_presets()
    if key in PRESETS:
        return dict(PRESETS[key]), key
    if key in project:
        try:
            return _from_project_preset(project[key]), f"{key} (vocab {project[key].get('vocab', PROJECT_VOCAB)})"
        except KeyError as e:
            raise UsageError(f"preset {key} in lifecycle/modeling.py lacks {e}; pass a config.json instead") from None
    if spec.endswith(".json") or "/" in spec or spec.startswith("."):
        raise UsageError(f"--model {spec} does not exist; pass an artifact directory, a config.json, or a preset "
                         f"({', '.join(preset_names())})")
    raise UsageError(f"unknown model preset {spec!r}; known presets: {', '.join(preset_names())} "
                     f"(or pass an artifact directory or a config.json)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); pass a transformers config.json") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object (a transformers config), found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the estimate needs, from a transformers config."""

    arch: str                # "llama" (llama/mistral/qwen2 blocks: RMSNorm, RoPE, SwiGLU, GQA) or "gpt2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    qkv_bias: bool = False   # qwen2: biases on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    model_type: str = "llama"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


LLAMA_TYPES = ("llama", "mistral", "qwen2")


def shape_from_config(cfg: dict) -> Shape:
    """Read a Llama-style (llama/mistral/qwen2) or GPT-2 config; name every missing field at once."""
    mt = str(cfg.get("model_type", "")).lower()
    if not mt:
        mt = "gpt2" if "n_embd" in cfg else "llama" if "hidden_size" in cfg else ""

    def need(*names: str) -> list[str]:
        return [n for n in names if not isinstance(cfg.get(n), int) or isinstance(cfg.get(n), bool) or cfg.get(n) <= 0]

    if mt == "gpt2":
        missing = need("n_embd", "n_layer", "n_head", "vocab_size")
        if missing:
            raise UsageError(f"GPT-2 config is missing or has non-positive {', '.join(missing)}; "
                             f"a GPT-2 config.json needs n_embd, n_layer, n_head, vocab_size (and n_positions)")
        h, a = cfg["n_embd"], cfg["n_head"]
        if h % a:
            raise UsageError(f"n_embd={h} is not divisible by n_head={a}")
        act = str(cfg.get("activation_function", "gelu_new"))
        return Shape(arch="gpt2", hidden=h, layers=cfg["n_layer"], heads=a, kv_heads=a, head_dim=h // a,
                     intermediate=int(cfg.get("n_inner") or 4 * h), vocab=cfg["vocab_size"],
                     tied=bool(cfg.get("tie_word_embeddings", True)), max_positions=int(cfg.get("n_positions", 1024)),
                     qkv_bias=True, o_bias=True, mlp_bias=True, act=act,
                     attn_dropout=float(cfg.get("attn_pdrop", 0.1)), resid_dropout=float(cfg.get("resid_pdrop", 0.1)),
                     embd_dropout=float(cfg.get("embd_pdrop", 0.1)), model_type="gpt2")
    if mt in LLAMA_TYPES or (not mt and "hidden_size" in cfg):
        missing = need("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if missing:
            raise UsageError(f"{mt or 'llama'} config is missing or has non-positive {', '.join(missing)}; a Llama-style "
                             f"config.json needs hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                             f"vocab_size (num_key_value_heads, head_dim and tie_word_embeddings are optional)")
        h, a = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or a
        hd = cfg.get("head_dim") or (h // a)
        if a % kv:
            raise UsageError(f"num_attention_heads={a} is not a multiple of num_key_value_heads={kv}")
        if not cfg.get("head_dim") and h % a:
            raise UsageError(f"hidden_size={h} is not divisible by num_attention_heads={a}; set head_dim")
        act = str(cfg.get("hidden_act", "silu"))
        if act not in ("silu", "swish"):
            raise UsageError(f"hidden_act={act!r}: only SwiGLU (silu) Llama-style blocks are modelled")
        bias = bool(cfg.get("attention_bias", False))
        return Shape(arch="llama", hidden=h, layers=cfg["num_hidden_layers"], heads=a, kv_heads=kv, head_dim=hd,
                     intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                     tied=bool(cfg.get("tie_word_embeddings", False)),
                     max_positions=int(cfg.get("max_position_embeddings", 4096)),
                     qkv_bias=bias or mt == "qwen2", o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)), act="silu",
                     attn_dropout=float(cfg.get("attention_dropout", 0.0)), model_type=mt or "llama")
    raise UsageError(f"model_type {mt or '(none)'!r} is not supported; supported: {', '.join(LLAMA_TYPES)}, gpt2 "
                     f"(Llama-style configs need hidden_size..., GPT-2 configs n_embd...)")


# ---------------------------------------------------------------------------
# 3. The parameter table
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    rows: int
    cols: int = 1            # 1 for vectors
    kind: str = "linear"     # linear | bias | norm | embed | pos | head | score
    layer: int = -1          # decoder layer, -1 outside the blocks
    role: str = ""           # q k v o gate up down | attn proj fc fc_proj (the LoRA target names)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


LORA_ROLES = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("attn", "proj", "fc", "fc_proj")}


def _layer_params(sh: Shape, i: int) -> list[ParamSpec]:
    h, q, kv, f = sh.hidden, sh.q_dim, sh.kv_dim, sh.intermediate
    if sh.arch == "gpt2":
        p = f"h.{i}."
        return [ParamSpec(p + "ln_1.weight", h, kind="norm", layer=i), ParamSpec(p + "ln_1.bias", h, kind="norm", layer=i),
                ParamSpec(p + "attn.c_attn.weight", h, 3 * h, layer=i, role="attn"),
                ParamSpec(p + "attn.c_attn.bias", 3 * h, kind="bias", layer=i, role="attn"),
                ParamSpec(p + "attn.c_proj.weight", h, h, layer=i, role="proj"),
                ParamSpec(p + "attn.c_proj.bias", h, kind="bias", layer=i, role="proj"),
                ParamSpec(p + "ln_2.weight", h, kind="norm", layer=i), ParamSpec(p + "ln_2.bias", h, kind="norm", layer=i),
                ParamSpec(p + "mlp.c_fc.weight", h, f, layer=i, role="fc"),
                ParamSpec(p + "mlp.c_fc.bias", f, kind="bias", layer=i, role="fc"),
                ParamSpec(p + "mlp.c_proj.weight", f, h, layer=i, role="fc_proj"),
                ParamSpec(p + "mlp.c_proj.bias", h, kind="bias", layer=i, role="fc_proj")]
    p = f"layers.{i}."
    out = [ParamSpec(p + "input_layernorm.weight", h, kind="norm", layer=i)]
    for role, o, n in (("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)):
        out.append(ParamSpec(f"{p}self_attn.{role}_proj.weight", o, n, layer=i, role=role))
        if (role != "o" and sh.qkv_bias) or (role == "o" and sh.o_bias):
            out.append(ParamSpec(f"{p}self_attn.{role}_proj.bias", o, kind="bias", layer=i, role=role))
    out.append(ParamSpec(p + "post_attention_layernorm.weight", h, kind="norm", layer=i))
    for role, o, n in (("gate", f, h), ("up", f, h), ("down", h, f)):
        out.append(ParamSpec(f"{p}mlp.{role}_proj.weight", o, n, layer=i, role=role))
        if sh.mlp_bias:
            out.append(ParamSpec(f"{p}mlp.{role}_proj.bias", o, kind="bias", layer=i, role=role))
    return out


def param_table(sh: Shape, head: str = "lm") -> list[ParamSpec]:
    """Every parameter tensor of the model (head="lm": causal LM; "score": a 1-output head, for reward/value models)."""
    h = sh.hidden
    out = [ParamSpec("wte.weight" if sh.arch == "gpt2" else "embed_tokens.weight", sh.vocab, h, kind="embed")]
    if sh.arch == "gpt2":
        out.append(ParamSpec("wpe.weight", sh.max_positions, h, kind="pos"))
    for i in range(sh.layers):
        out += _layer_params(sh, i)
    out.append(ParamSpec("ln_f.weight" if sh.arch == "gpt2" else "norm.weight", h, kind="norm"))
    if sh.arch == "gpt2":
        out.append(ParamSpec("ln_f.bias", h, kind="norm"))
    if head == "score":
        out.append(ParamSpec("score.weight", 1, h, kind="score"))
    elif not sh.tied:
        out.append(ParamSpec("lm_head.weight", sh.vocab, h, kind="head"))
    return out


def count_params(config: dict | Shape) -> int:
    sh = config if isinstance(config, Shape) else shape_from_config(config)
    return sum(p.numel for p in param_table(sh))


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(packed weight bytes, quantization-constant bytes) of one NF4 tensor with double quantization.

    QLoRA (Dettmers et al. 2023, sec. 3): 4-bit weights, one absmax per 64 weights,
    absmaxes quantized to 8 bits with one fp32 constant per 256 of them:
    4 + 8/64 + 32/(64*256) = 4.127 bits per weight. bitsandbytes also keeps, per
    tensor, the 16-entry NF4 code and the 256-entry 8-bit code in fp32 and an fp32 offset.
    """
    blocks = -(-numel // NF4_BLOCK)
    consts = blocks + 4 * -(-blocks // NF4_DQ_BLOCK) + 4 * 16 + 4 * 256 + 4
    return -(-numel // 2), consts


# ---------------------------------------------------------------------------
# 4. The activation graph: what autograd keeps, op by op
# ---------------------------------------------------------------------------
class _S:
    """A storage: saved tensors are counted once per storage."""

    __slots__ = ("nbytes", "param")

    def __init__(self, nbytes: int, param: bool = False):
        self.nbytes, self.param = nbytes, param


class _T:
    """A symbolic tensor: element count, bytes per element, requires_grad, storage."""

    __slots__ = ("n", "dt", "grad", "st", "trainable", "quant")

    def __init__(self, n: int, dt: int, grad: bool, st: _S | None = None):
        self.n, self.dt, self.grad = n, dt, grad
        self.st = st or _S(n * dt)
        self.trainable, self.quant = grad, False


def _param(n: int, dt: int, trainable: bool, quant: bool = False) -> _T:
    t = _T(n, dt, trainable, _S(0, param=True))
    t.trainable, t.quant = trainable, quant
    return t


class _Graph:
    """Collects the tensors saved for backward, by storage, with a category each.

    Rules used (PyTorch derivatives.yaml / autocast_mode.h, checked with saved_tensors_hooks):
      - mm/addmm/bmm save an input only when the *other* input requires grad;
        mul saves each operand when the other requires grad; add, casts, views,
        scaling by a Python number and cat save nothing.
      - silu/gelu save the input, tanh/softmax/log_softmax/rsqrt the result.
      - autocast (lower precision list: linear, matmul, bmm, addmm, sdpa) casts fp32
        inputs to 16-bit; casts of leaf parameters that require grad are cached until
        autocast exits, other casts are made per call. On CUDA pow, rsqrt, softmax,
        log_softmax and layer_norm run in fp32 (autocast fp32 list); on CPU they
        keep their input dtype.
      - dropout with p=0 is the identity; with p>0 it saves a mask: bool (1 byte)
        on CUDA (native_dropout), the input's dtype on CPU.
    """

    def __init__(self, *, autocast: bool, half: int, device: str, qcompute: int):
        self.autocast, self.half, self.device, self.qcompute = autocast, half, device, qcompute
        self.saved: dict[int, tuple[_S, str]] = {}
        self.cache: dict[int, _T] = {}   # autocast cast cache (trainable leaves)
        self.cat = "act"
        self.mask_dt = 4

    # -- bookkeeping --
    def new(self, n: int, dt: int, grad: bool) -> _T:
        return _T(n, dt, grad)

    def save(self, t: _T, cat: str | None = None) -> None:
        if t.st.param or id(t.st) in self.saved:
            return
        self.saved[id(t.st)] = (t.st, cat or self.cat)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st, cat in self.saved.values():
            out[cat] = out.get(cat, 0) + st.nbytes
        out["cache"] = sum(t.st.nbytes for t in self.cache.values())
        return out

    def cast(self, t: _T, dt: int) -> _T:
        return t if t.dt == dt else self.new(t.n, dt, t.grad)

    def _ac(self, x: _T) -> _T:
        return self.cast(x, self.half) if self.autocast and x.dt == 4 else x

    def weight(self, p: _T) -> _T:
        """The tensor a matmul uses for parameter p (under autocast: its 16-bit copy)."""
        if not (self.autocast and p.dt == 4):
            return p
        if p.trainable:
            c = self.cache.get(id(p))
            if c is None:
                c = self.cache[id(p)] = self.new(p.n, self.half, True)
            return c
        return self.new(p.n, self.half, False)

    # -- ops --
    def linear(self, x: _T, p: _T, fan_in: int, fan_out: int, bias: _T | None = None) -> _T:
        n_out = x.n // fan_in * fan_out
        if p.quant:  # bitsandbytes Linear4bit: a custom autograd.Function keeps only the packed weight
            self.cast(x, self.qcompute)
            if bias is not None and self.autocast and bias.trainable:
                self.weight(bias)
            return self.new(n_out, x.dt, x.grad or (bias is not None and bias.trainable))
        xi, w = self._ac(x), self.weight(p)
        if bias is not None and self.autocast and bias.dt == 4:
            self.weight(bias)  # cast (cached when trainable) but never saved
        grad = x.grad or p.trainable or (bias is not None and bias.trainable)
        if grad:
            if p.trainable:
                self.save(xi)
            if x.grad:
                self.save(w, "copy")
        return self.new(n_out, xi.dt, grad)

    def mul(self, a: _T, b: _T) -> _T:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(max(a.n, b.n), max(a.dt, b.dt), a.grad or b.grad)

    def add(self, a: _T, b: _T) -> _T:
        return self.new(max(a.n, b.n), max(a.dt, b.dt), a.grad or b.grad)

    def scale(self, a: _T) -> _T:
        return self.new(a.n, a.dt, a.grad)

    def _fp32_listed(self, x: _T) -> _T:
        """Autocast's fp32 list on CUDA (pow, rsqrt, softmax, log_softmax, layer_norm)."""
        return self.cast(x, 4) if self.autocast and self.device == "cuda" else x

    def unary_saves_input(self, x: _T) -> _T:   # silu, gelu
        if x.grad:
            self.save(x)
        return self.new(x.n, x.dt, x.grad)

    def unary_saves_result(self, x: _T) -> _T:  # tanh
        out = self.new(x.n, x.dt, x.grad)
        if x.grad:
            self.save(out)
        return out

    def dropout(self, x: _T, p: float) -> _T:
        if p <= 0:
            return x
        if x.grad:
            self.save(self.new(x.n, 1 if self.device == "cuda" else x.dt, False))
        return self.new(x.n, x.dt, x.grad)

    def embedding(self, ids: _T, p: _T, n_out: int) -> _T:
        if p.trainable:
            self.save(ids, "misc")
        return self.new(n_out, p.dt, p.trainable)

    def rmsnorm(self, x: _T, w: _T, h: int) -> _T:
        """LlamaRMSNorm: x.float(); x * rsqrt(x.pow(2).mean(-1) + eps); weight * x.to(input_dtype)."""
        xf = self.cast(x, 4)
        if xf.grad:
            self.save(xf)                                 # pow(2) and the mul keep the fp32 input
            self.save(self.new(x.n // h, 4, False))       # rsqrt result
        normed = self.cast(self.new(x.n, 4, xf.grad), x.dt)
        if w.trainable:
            self.save(normed)
        return self.new(x.n, max(w.dt, normed.dt), normed.grad or w.trainable)

    def layernorm(self, x: _T, w: _T, h: int) -> _T:
        xi = self._fp32_listed(x)
        if xi.grad or w.trainable:
            self.save(xi)
            stat = 4 if (xi.dt == 4 or self.device == "cuda") else xi.dt
            self.save(self.new(x.n // h, stat, False))    # mean
            self.save(self.new(x.n // h, stat, False))    # rstd
        return self.new(x.n, xi.dt, xi.grad or w.trainable)

    def softmax(self, x: _T, dtype: int | None = None) -> _T:
        xi = self._fp32_listed(x)
        out = self.new(x.n, dtype or xi.dt, x.grad)
        if x.grad:
            self.save(out)
        return out

    def bmm(self, a: _T, b: _T, n_out: int, ac: bool = True) -> _T:
        if ac:  # ops inside SDPA's math kernel run below the autocast dispatch: no casts there
            a, b = self._ac(a), self._ac(b)
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(n_out, a.dt, a.grad or b.grad)


@dataclass
class _Run:
    """One forward pass worth of settings for `_forward`."""

    sh: Shape
    b: int
    s: int
    attn: str
    ckpt: bool
    device: str
    autocast: bool
    half: int
    pdt: int                  # dtype of the (unquantized) weights
    adt: int                  # dtype of LoRA adapters
    qcompute: int             # bnb_4bit_compute_dtype
    trainable_base: bool      # full fine-tuning
    quant: bool
    lora_roles: tuple = ()
    lora_r: int = 0
    lora_dropout: float = 0.0
    head: str = "lm"          # lm | score
    dropout: bool = True      # apply the config's dropout probabilities (train mode)


def _sdpa_backend(run: _Run, dt: int, p: float, groups: int) -> str:
    if run.device == "cpu":
        return "flash" if p == 0 else "math"          # the CPU flash kernel has no dropout
    if dt != 4:
        return "flash"
    return "math" if groups > 1 else "efficient"     # fp32: no flash; mem-efficient has no enable_gqa


def _attention(g: _Graph, run: _Run, q: _T, k: _T, v: _T, p: float) -> _T:
    sh, b, s = run.sh, run.b, run.s
    a, hd, groups = sh.heads, sh.head_dim, sh.heads // sh.kv_heads
    nq, nrep, ns2 = b * a * s * hd, b * a * s * hd, b * a * s * s
    grad = q.grad or k.grad or v.grad
    if run.attn == "sdpa":
        q, k, v = g._ac(q), g._ac(k), g._ac(v)
        backend = _sdpa_backend(run, q.dt, p, groups)
        if backend != "math":
            out = g.new(nq, q.dt, grad)
            if grad:
                g.cat = "act"
                for t in (q, k, v, out):   # K, V unrepeated (enable_gqa); out is also the o_proj input
                    g.save(t)
                g.save(g.new(b * a * (s if backend == "flash" else -(-s // 32) * 32), 4, False))  # logsumexp
            return out
        # math fallback: upcasts 16-bit to fp32, keeps the s x s matrices
        qs, ks, vs = (g.new(nrep, 4, t.grad) for t in (q, k, v))
        g.cat = "attn_s2"
        sc = g.bmm(qs, ks, ns2, ac=False)
        pr = g.new(ns2, 4, sc.grad)
        if sc.grad:
            g.save(pr)                                  # softmax result
        pr = g.dropout(pr, p)
        o = g.bmm(pr, vs, nq, ac=False)
        g.cat = "act"
        o = g.cast(o, q.dt)
        return g.new(nq, o.dt, grad)             # transpose(1, 2).contiguous(): a copy
    # eager
    if sh.arch == "gpt2":
        # q, k, v are strided views of c_attn's output: matmul copies them to (b*a, s, d)
        qc, kc, vc = (g.new(nq, t.dt, t.grad) for t in (q, k, v))
        g.cat = "attn_s2"
        sc = g.scale(g.bmm(qc, kc, ns2))
        sc = g.add(sc, g.new(1, g.mask_dt, False))             # + the 4-D causal mask (embedding dtype)
        pr = g.softmax(sc)
        pr = g.cast(pr, vc.dt)
        pr = g.dropout(pr, p)
        o = g.bmm(pr, vc, nq)
    else:
        kr = k if groups == 1 else g.new(nrep, k.dt, k.grad)   # repeat_kv
        vr = g.new(nrep, v.dt, v.grad)                          # repeat_kv / the strided view copied by matmul
        g.cat = "attn_s2"
        sc = g.scale(g.bmm(q, kr, ns2))
        pr = g.softmax(sc, dtype=4)                             # softmax(..., dtype=float32)
        pr = g.cast(pr, q.dt)                                   # .to(query.dtype)
        pr = g.dropout(pr, p)
        o = g.bmm(pr, vr, nq)
    g.cat = "act"
    return g.new(nq, o.dt, grad)                               # transpose(1, 2).contiguous()


class _Model:
    """The parameters of one model as symbolic leaves, per decoder layer."""

    def __init__(self, run: _Run):
        self.run = run
        sh = run.sh
        base_t = run.trainable_base
        self.embed = _param(sh.vocab * sh.hidden, run.pdt, base_t)
        self.pos = _param(sh.max_positions * sh.hidden, run.pdt, base_t) if sh.arch == "gpt2" else None
        self.final_norm = _param(sh.hidden, run.pdt, base_t)
        if run.head == "score":
            self.head = _param(sh.hidden, run.pdt, True)
        else:
            self.head = self.embed if sh.tied else _param(sh.vocab * sh.hidden, run.pdt, base_t)

    def layer(self):
        """Fresh leaves for one decoder layer: {role: (weight, bias, fan_in, fan_out, lora)}."""
        run, sh = self.run, self.run.sh
        base_t = run.trainable_base
        h, q, kv, f = sh.hidden, sh.q_dim, sh.kv_dim, sh.intermediate
        if sh.arch == "gpt2":
            dims = {"attn": (h, 3 * h, True), "proj": (h, h, True), "fc": (h, f, True), "fc_proj": (f, h, True)}
        else:
            dims = {"q": (h, q, sh.qkv_bias), "k": (h, kv, sh.qkv_bias), "v": (h, kv, sh.qkv_bias), "o": (q, h, sh.o_bias),
                    "gate": (h, f, sh.mlp_bias), "up": (h, f, sh.mlp_bias), "down": (f, h, sh.mlp_bias)}
        out = {}
        for role, (fi, fo, has_bias) in dims.items():
            w = _param(fi * fo, run.pdt, base_t, quant=run.quant)
            bias = _param(fo, run.qcompute if run.quant else run.pdt, base_t) if has_bias else None
            lora = None
            if role in run.lora_roles:
                lora = (_param(fi * run.lora_r, run.adt, True), _param(run.lora_r * fo, run.adt, True))
            out[role] = (w, bias, fi, fo, lora)
        out["norm1"] = _param(h, run.pdt, base_t)
        out["norm2"] = _param(h, run.pdt, base_t)
        return out


def _proj(g: _Graph, run: _Run, x: _T, spec) -> _T:
    """nn.Linear / Conv1D / bnb Linear4bit, wrapped by a peft LoRA layer when it has an adapter."""
    w, bias, fi, fo, lora = spec
    result = g.linear(x, w, fi, fo, bias)
    if lora is None:
        return result
    A, B = lora
    result_dt = result.dt
    if w.quant:
        result = g.new(result.n, result.dt, result.grad)          # peft's defensive clone()
        # peft skips the cast when torch.is_autocast_enabled(), which only looks at CUDA autocast
        convert = not (g.autocast and g.device == "cuda")
    else:
        convert = True
    prev, g.cat = g.cat, "lora"
    xl = g.cast(x, A.dt) if convert else x                         # peft _cast_input_dtype
    xl = g.dropout(xl, run.lora_dropout)
    a = g.linear(xl, A, fi, run.lora_r)
    y = g.scale(g.linear(a, B, run.lora_r, fo))                    # * scaling
    if w.quant and convert:
        y = g.cast(y, result_dt)
    result = g.add(result, y)
    g.cat = prev
    return result if w.quant else g.cast(result, result_dt)       # result.to(torch_result_dtype)


def _rope(g: _Graph, t: _T, cos: _T, sin: _T) -> _T:
    """q * cos + rotate_half(q) * sin: the muls keep cos and sin (shared by all layers)."""
    c = g.mul(t, cos)
    s_ = g.mul(g.new(t.n, t.dt, t.grad), sin)
    return g.add(c, s_)


def _layer(g: _Graph, run: _Run, x: _T, L: dict, cos: _T | None, sin: _T | None) -> _T:
    sh, tok = run.sh, run.b * run.s
    h = sh.hidden
    g.cat = "act"
    if sh.arch == "gpt2":
        pd, pa = (sh.resid_dropout, sh.attn_dropout) if run.dropout else (0.0, 0.0)
        y = g.layernorm(x, L["norm1"], h)
        qkv = _proj(g, run, y, L["attn"])
        q = _T(tok * h, qkv.dt, qkv.grad, qkv.st)                  # split(): views of one storage
        k = _T(tok * h, qkv.dt, qkv.grad, qkv.st)
        v = _T(tok * h, qkv.dt, qkv.grad, qkv.st)
        o = _attention(g, run, q, k, v, pa)
        o = g.dropout(_proj(g, run, o, L["proj"]), pd)
        x = g.add(o, x)
        y = g.layernorm(x, L["norm2"], h)
        f = _proj(g, run, y, L["fc"])
        f = _gelu(g, run, f)
        f = g.dropout(_proj(g, run, f, L["fc_proj"]), pd)
        return g.add(x, f)
    y = g.rmsnorm(x, L["norm1"], h)
    q = _rope(g, _proj(g, run, y, L["q"]), cos, sin)
    k = _rope(g, _proj(g, run, y, L["k"]), cos, sin)
    v = _proj(g, run, y, L["v"])
    o = _attention(g, run, q, k, v, sh.attn_dropout if run.dropout else 0.0)
    x = g.add(x, _proj(g, run, o, L["o"]))
    y = g.rmsnorm(x, L["norm2"], h)
    gate = _proj(g, run, y, L["gate"])
    up = _proj(g, run, y, L["up"])
    m = g.mul(g.unary_saves_input(gate), up)                       # silu(gate) * up
    return g.add(x, _proj(g, run, m, L["down"]))


def _gelu(g: _Graph, run: _Run, x: _T) -> _T:
    if run.sh.act in ("gelu_new", "gelu_fast"):
        # NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))
        xp = g._fp32_listed(x)
        if xp.grad:
            g.save(xp)                                             # pow keeps its input
        cube = g.new(x.n, xp.dt, x.grad)
        inner = g.scale(g.add(x, g.scale(cube)))
        t = g.unary_saves_result(inner)
        one_t = g.add(t, t)                                        # 1 + tanh
        half_x = g.scale(x)                                        # 0.5 * x
        return g.mul(half_x, one_t)
    return g.unary_saves_input(x)                                  # F.gelu (exact or tanh): keeps its input


def _forward(run: _Run, sim_layers: int = 2) -> dict[str, Any]:
    """Simulate one training forward; returns bytes per category, extrapolated to all layers."""
    sh, b, s = run.sh, run.b, run.s
    tok, h = b * s, sh.hidden
    g = _Graph(autocast=run.autocast, half=run.half, device=run.device, qcompute=run.qcompute)
    M = _Model(run)
    g.cat = "misc"
    ids = g.new(tok, 8, False)
    x = g.embedding(ids, M.embed, tok * h)
    g.mask_dt = x.dt                        # eager attention masks are built in the embeddings' dtype
    if run.ckpt and not x.grad:
        x.grad = True                       # HF enable_input_require_grads() when checkpointing
    cos = sin = None
    if sh.arch == "gpt2":
        pos = g.new(s, 8, False)
        x = g.add(x, g.embedding(pos, M.pos, s * h))
        if run.ckpt and run.attn == "eager":
            g.save(g.new(b * s * s, x.dt, False))   # the 4-D causal mask, a positional argument of each block
        x = g.dropout(x, sh.embd_dropout if run.dropout else 0.0)
    else:
        cos, sin = g.new(s * sh.head_dim, x.dt, False), g.new(s * sh.head_dim, x.dt, False)
    n_sim = min(sh.layers, sim_layers)
    per_layer: list[dict[str, int]] = []
    recompute = 0
    for _ in range(n_sim):
        before = g.totals()
        L = M.layer()
        if run.ckpt:
            g.cat = "act"
            g.save(x)                       # checkpoint keeps the layer input
            outer = g.saved
            g.saved = {}
            x_in = x
            x = _layer(g, run, x, L, cos, sin)
            inner = sum(st.nbytes for st, _ in g.saved.values() if st is not x_in.st)
            recompute = max(recompute, inner)
            g.saved = outer
        else:
            x = _layer(g, run, x, L, cos, sin)
        after = g.totals()
        per_layer.append({k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)})
    g.cat = "act"
    if sh.arch == "gpt2":
        y = g.layernorm(x, M.final_norm, h)
    else:
        y = g.rmsnorm(x, M.final_norm, h)
    held = 0
    if run.head == "score":
        logits = g.linear(y, M.head, h, 1)
        held = b * logits.dt                # the pooled (last-token) scores the output holds
        g.cat = "misc"
        if logits.grad:
            g.save(g.new(b, 8, False))      # logits[arange(b), last_index]: both index tensors
            g.save(g.new(b, 8, False))
    else:
        logits = g.linear(y, M.head, h, sh.vocab)
        held = logits.st.nbytes             # CausalLMOutput.logits, alive while the output is
        lf = g.cast(logits, 4)              # ForCausalLMLoss: logits.float()
        if lf.grad:
            g.save(g.new(lf.n, 4, True), "logits")   # log_softmax result (cross_entropy)
            g.save(g.new(tok, 8, False), "misc")     # shifted labels
            g.save(g.new(1, 4, False), "misc")       # nll_loss total_weight
    tot = g.totals()
    # extrapolate: layers after the simulated ones repeat the last simulated layer
    extra = sh.layers - n_sim
    if extra > 0:
        for k, v in per_layer[-1].items():
            tot[k] = tot.get(k, 0) + extra * v
    tot["held_logits"] = held
    tot["recompute"] = recompute
    tot["saved_copies"] = tot.get("copy", 0)
    return tot


# ---------------------------------------------------------------------------
# 5. The estimate
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
        if self.device_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append("")
            lines.append(f"verdict: {verdict} in {fmt_bytes(self.device_bytes)} per GPU "
                         f"({100 * self.total_bytes / self.device_bytes:.0f}% used); largest micro-batch that fits: "
                         f"{self.max_batch_size if self.max_batch_size else 'none (not even batch 1)'}")
        for wmsg in self.warnings:
            lines.append(f"note: {wmsg}")
        return "\n".join(lines)


def regime_of(dtype: str, precision: str | None, zero: int = 0, mp_style: str | None = None) -> tuple[str, str]:
    """(regime, mp_style): regime is fp32 | mixed | pure; mp_style autocast | master for mixed."""
    if dtype == "fp32":
        if precision not in (None, "pure"):
            raise UsageError(f"--precision {precision} needs a 16-bit --dtype (bf16 or fp16); with --dtype fp32 everything is fp32")
        return "fp32", ""
    precision = precision or "mixed"
    if precision == "pure":
        return "pure", ""
    style = mp_style or ("master" if zero > 0 else "autocast")
    return "mixed", style


def _regime_label(regime: str, style: str, dtype: str, method: str = "full") -> str:
    adapters = method != "full"
    if regime == "fp32":
        return "fp32"
    if regime == "pure":
        return (f"pure {dtype} (16-bit frozen base, fp32 adapters as peft keeps them)" if adapters else
                f"pure {dtype} (16-bit weights and optimizer states, no master copy)")
    if style == "autocast":
        return (f"mixed {dtype} (autocast; frozen base in {dtype}, fp32 adapters)" if adapters else
                f"mixed {dtype} (autocast: fp32 weights and grads, 16-bit compute copies)")
    return f"mixed {dtype} (16-bit weights and grads + fp32 master copy, as DeepSpeed/Megatron)"


def _opt_state_bytes(specs: list[tuple[int, int, int, int]], optimizer: str, device: str) -> tuple[int, int]:
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


def _validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len, lora_r,
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


def estimate(
    config: dict | Shape,
    *,
    stage: str = "sft",
    method: str = "full",
    lora_r: int = 16,
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
    gpu_memory: int | None = None,
    name: str = "model",
) -> Estimate:
    """Predict per-GPU memory of one training step (or inference) of `config`.

    `config` is a transformers config dict (or a Shape). `device` picks the
    backend rules: "cuda" (the default; adds CUDA context/allocator overhead) or
    "cpu" (what `--measure` checks on a machine without a GPU). `gpu_memory`
    (bytes) adds a verdict and the largest micro-batch that fits.
    """
    _validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len, lora_r,
              device, mp_style)
    sh = config if isinstance(config, Shape) else shape_from_config(config)
    kw = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision, optimizer=optimizer,
              seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn, zero=zero, gpus=gpus, device=device, mp_style=mp_style,
              lora_dropout=lora_dropout, lora_targets=tuple(lora_targets) if lora_targets else None, dropout=dropout,
              name=name)
    if sh.arch == "gpt2" and seq_len > sh.max_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's n_positions={sh.max_positions} (GPT-2 has learned "
                         f"positions); pass --seq-len {sh.max_positions} or less")
    est = _estimate(sh, batch_size=batch_size, **kw)
    if sh.arch == "llama" and seq_len > sh.max_positions:
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


def _dtypes(regime: str, style: str, half: int, method: str, trains: bool) -> dict[str, Any]:
    """Bytes per element of base weights, adapters, 4-bit compute, and whether autocast runs.

    fp32: everything fp32. mixed/autocast: weights that train are fp32 (they are the
    master copy) and autocast computes in 16-bit; frozen weights (LoRA/QLoRA base,
    reference and reward models) are stored in 16-bit, as loading with
    torch_dtype=bfloat16 does. mixed/master: 16-bit weights, fp32 master copy in the
    optimizer, no autocast. pure: 16-bit weights and states. LoRA adapters are fp32
    except under mixed/master (peft keeps adapters fp32 by default: autocast_adapter_dtype).
    """
    autocast = regime == "mixed" and style == "autocast" and trains
    full_train = method == "full" and trains
    if regime == "fp32":
        pdt = 4
    elif autocast and full_train:
        pdt = 4
    else:
        pdt = half
    return dict(pdt=pdt, adt=half if (regime == "mixed" and style == "master") else 4,
                qcompute=4 if regime == "fp32" else half, autocast=autocast)


def _model_states(sh: Shape, *, method: str, regime: str, style: str, half: int, optimizer: str, lora_r: int,
                  lora_roles: tuple, device: str, trains: bool, head: str = "lm") -> dict[str, int]:
    """Bytes of weights, adapters, quantization constants, master copy, grads and optimizer state."""
    d = _dtypes(regime, style, half, method, trains)
    pdt, qcompute, adt = d["pdt"], d["qcompute"], d["adt"]
    full = method == "full"
    quant = method == "qlora"
    rows = dict(params_bytes=0, lora_params_bytes=0, quant_constants_bytes=0, master_bytes=0, grads_bytes=0,
                optimizer_bytes=0, optimizer_step_bytes=0, n_params=0, n_trainable=0, largest_layer=0)
    trainable: list[tuple[int, int, int, int]] = []      # (numel, rows, cols, dtype bytes)
    layer_bytes: dict[int, int] = {}
    for p in param_table(sh, head=head):
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
            rows["params_bytes"] += b       # peft modules_to_save: a trainable copy next to the original
            trainable.append((p.numel, p.rows, p.cols, pdt))
        if p.role in lora_roles and p.kind == "linear" and not full:
            fan_in, fan_out = (p.rows, p.cols) if sh.arch == "gpt2" else (p.cols, p.rows)   # Conv1D is (in, out)
            for n, r, c in ((fan_in * lora_r, lora_r, fan_in), (lora_r * fan_out, fan_out, lora_r)):
                rows["lora_params_bytes"] += n * adt
                rows["n_params"] += n
                if trains:
                    trainable.append((n, r, c, adt))
    rows["largest_layer"] = max(layer_bytes.values(), default=0)
    rows["n_trainable"] = sum(n for n, _, _, _ in trainable)
    rows["grads_bytes"] = sum(n * dt for n, _, _, dt in trainable)
    master = regime == "mixed" and style == "master"
    if master:
        rows["master_bytes"] = 4 * rows["n_trainable"]
        trainable = [(n, r, c, 4) for n, r, c, _ in trainable]   # states live next to the fp32 master copy
    rows["optimizer_bytes"], rows["optimizer_step_bytes"] = _opt_state_bytes(trainable, optimizer, device)
    return rows


def _activation_rows(sh: Shape, *, b: int, s: int, method: str, regime: str, style: str, half: int, attn: str,
                     ckpt: bool, device: str, lora_r: int, lora_roles: tuple, lora_dropout: float, dropout: bool,
                     head: str = "lm") -> dict[str, int]:
    d = _dtypes(regime, style, half, method, True)
    run = _Run(sh=sh, b=b, s=s, attn=attn, ckpt=ckpt, device=device, autocast=d["autocast"], half=half, pdt=d["pdt"],
               adt=d["adt"], qcompute=d["qcompute"], trainable_base=(method == "full"),
               quant=(method == "qlora"), lora_roles=lora_roles if method != "full" else (), lora_r=lora_r,
               lora_dropout=lora_dropout, head=head, dropout=dropout)
    t = _forward(run)
    act = t.get("act", 0) + t.get("attn_s2", 0) + t.get("lora", 0) + t.get("misc", 0)
    logits_held = t["held_logits"]
    return {
        "weight_copies_bytes": t.get("copy", 0),
        "activations_bytes": act,
        "logits_bytes": t.get("logits", 0) + logits_held,
        "loss_backward_bytes": 2 * 4 * b * s * sh.vocab if head == "lm" else 0,
        "recompute_bytes": t["recompute"],
        "autocast_cache_bytes": max(0, t.get("cache", 0) - t.get("copy", 0)) if run.autocast else 0,
        "attn_s2": t.get("attn_s2", 0),
        "lora_act": t.get("lora", 0),
    }


def _estimate(sh: Shape, *, stage: str, method: str, lora_r: int, dtype: str, precision: str | None, optimizer: str,
              batch_size: int, seq_len: int, grad_ckpt: str, attn: str, zero: int, gpus: int, device: str,
              mp_style: str | None, lora_dropout: float, lora_targets: tuple | None, dropout: bool, name: str) -> Estimate:
    regime, style = regime_of(dtype, precision, zero, mp_style)
    half = DTYPES[dtype] if regime != "fp32" else 4
    roles_all = LORA_ROLES[sh.arch]
    lora_roles = tuple(r for r in roles_all if r in lora_targets) if lora_targets else roles_all
    settings = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=regime, mp_style=style or None,
                    optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn,
                    zero=zero, gpus=gpus, device=device, lora_targets=list(lora_roles) if method != "full" else None)
    common = dict(method=method, regime=regime, style=style, half=half, lora_r=lora_r, lora_roles=lora_roles,
                  device=device)
    act_kw = dict(attn=attn, ckpt=grad_ckpt == "full", lora_dropout=lora_dropout, dropout=dropout)
    notes = dict(ROW_NOTES)
    warnings: list[str] = []
    details: dict[str, Any] = {}
    roles: list[dict] = []

    if stage == "inference":
        ms = _model_states(sh, optimizer=optimizer, trains=False, **common)
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
        b = batch_size * (2 if stage == "reward" else 1)   # chosen + rejected in one forward (TRL)
        head = "score" if stage == "reward" else "lm"
        model_list = [("actor" if stage == "ppo" else "policy", True, head)]
        if stage == "ppo":
            model_list += [("critic", True, "score"), ("reference", False, "lm"), ("reward", False, "score")]
        states = {k: 0 for k in STATE_ROWS}   # ddp_buckets_bytes is filled in below
        step_temp, largest_layer = 0, 0
        fwd_phases = []
        n_params = n_train = 0
        for role, trains, hd in model_list:
            if role == "reference" and method != "full":
                roles.append(dict(role=role, trains=False, bytes=0,
                                  what="the actor's base weights with its adapters disabled (no copy)"))
                continue
            ms = _model_states(sh, optimizer=optimizer, trains=trains, head=hd, **common)
            for k in STATE_ROWS:
                states[k] += ms.get(k, 0)
            step_temp += ms["optimizer_step_bytes"]
            largest_layer = max(largest_layer, ms["largest_layer"])
            if role in ("actor", "policy"):
                n_params += ms["n_params"]
            if trains:
                n_train += ms["n_trainable"]
                a = _activation_rows(sh, b=b, s=seq_len, head=hd, **common, **act_kw)
                fwd_phases.append((role, a))
            if stage == "ppo":
                roles.append(dict(role=role, trains=trains, bytes=sum(ms.get(k, 0) for k in STATE_ROWS),
                                  what=("trains: weights + grads + optimizer" if trains else "frozen weights, forward only")
                                  + (" (value head)" if hd == "score" else "")))
        # the trained models run forward/backward one after another: the largest phase counts
        role, a = max(fwd_phases, key=lambda ra: sum(ra[1][k] for k in ("weight_copies_bytes", "activations_bytes",
                                                                         "logits_bytes", "loss_backward_bytes",
                                                                         "recompute_bytes")))
        if stage == "ppo":
            details["activations_from"] = role
            kdt = 4 if regime == "fp32" else half
            details["rollout_kv_cache_bytes"] = 2 * sh.layers * sh.kv_heads * sh.head_dim * seq_len * batch_size * kdt
        rows = dict(states)
        rows["weight_copies_bytes"] = a["weight_copies_bytes"]
        rows["activations_bytes"] = a["activations_bytes"]
        rows["logits_bytes"] = a["logits_bytes"]
        details["attention_s2_bytes"] = a["attn_s2"]
        details["lora_activation_bytes"] = a["lora_act"]
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
        phase = "forward/backward" if fwd >= step else "optimizer step"
        total = states_total + max(fwd, step)
        if stage == "ppo":
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
# 6. Closed forms from the literature (docs/memory.md; the tests hold the estimate to them)
# ---------------------------------------------------------------------------
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


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, flash: bool = False) -> int:
    """Activations of one GPT layer in 16-bit with 1-byte dropout masks: s*b*h*(34 + 5*a*s/h).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", eq. 1 (no tensor/sequence parallelism). The 5*a*s/h term is the
    attention scores, softmax and dropout mask/output that SDPA/flash do not keep.
    """
    return s * b * h * 34 + (0 if flash else 5 * a * s * s * b)


def kv_cache_bytes(config: dict | Shape, batch: int, tokens: int, bytes_per: int = 2) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch elements."""
    sh = config if isinstance(config, Shape) else shape_from_config(config)
    return 2 * sh.layers * sh.kv_heads * sh.head_dim * tokens * batch * bytes_per


# ---------------------------------------------------------------------------
# 7. The check the stages call before training
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
               echo=print, **kw: Any) -> Estimate:
    """Estimate, and refuse (UsageError) a run that will not fit the device unless `force`.

    `device_bytes=None` asks the CUDA device (device_memory); on CPU there is no
    verdict and no refusal. With `force` a run that does not fit prints one
    warning line instead. Other keyword arguments go to `estimate`.
    """
    if device_bytes is None:
        device_bytes = device_memory()
        if device_bytes is None:
            kw.setdefault("device", "cpu")
            return estimate(model_config, stage=stage, method=method, batch_size=batch_size, seq_len=seq_len,
                            gpus=gpus, **kw)
    est = estimate(model_config, stage=stage, method=method, batch_size=batch_size, seq_len=seq_len, gpus=gpus,
                   gpu_memory=device_bytes, **kw)
    if not est.fits:
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
# 8. `llm estimate-memory`
# ---------------------------------------------------------------------------
def cli_estimate(*, model: str, stage: str = "sft", method: str = "full", lora_r: int = 16, dtype: str = "bf16",
                 precision: str | None = None, mp_style: str | None = None, optimizer: str = "adamw",
                 batch_size: int = 1, seq_len: int | None = None, grad_ckpt: str = "none", attn: str = "sdpa",
                 zero: int = 0, gpus: int = 1, gpu_memory: str | None = None, device: str = "cuda",
                 as_json: bool = False, measure: bool = False, echo=print) -> Estimate:
    """The command: read the model, estimate, print a table (or JSON); with measure, run one step and compare."""
    config, name = load_model_config(model)
    sh = shape_from_config(config)
    if seq_len is None:
        seq_len = min(2048, sh.max_positions)
    try:
        limit = parse_size(gpu_memory) if gpu_memory is not None else None
    except UsageError as e:
        raise UsageError(f"--gpu-memory {gpu_memory}: {e}") from None
    kw = dict(stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision, optimizer=optimizer,
              batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn)
    if measure:
        if zero or gpus != 1 or mp_style == "master":
            raise UsageError("--measure runs one step on this machine's single device; drop --zero/--gpus/--mp-style master")
        if stage not in ("pretrain", "sft", "reward"):
            raise UsageError(f"--measure runs one training step of one model; --stage {stage} is estimate-only "
                             f"(use pretrain, sft or reward)")
        _validate(stage, method, dtype, precision, optimizer, grad_ckpt, attn, zero, gpus, batch_size, seq_len, lora_r,
                  device, mp_style)
        from lifecycle import memory_measure  # torch from here on

        memory_measure.measure_cli(config, name, echo=echo, as_json=as_json, **kw)
        return None  # type: ignore[return-value]
    est = estimate(config, zero=zero, gpus=gpus, device=device, mp_style=mp_style, gpu_memory=limit, name=name, **kw)
    echo(json.dumps(est.to_dict(), indent=2) if as_json else est.table())
    return est
