"""What the estimator knows about a model without building it: its shape, its parameter tensors, their storage.

No torch. `shape_from_config` reads the families that have a closed form
(Llama-style blocks: llama, mistral, qwen2, qwen3 with its QK-norm; and GPT-2);
`param_table` lists every parameter tensor those models have; `nf4_bytes`
sizes a 4-bit QLoRA tensor; `regime_of` / `dtypes_for` say which dtype each
kind of tensor is stored and computed in under a precision setting.

Any other architecture raises `NoClosedForm`; lifecycle.memory then counts it
from the real module tree instead (lifecycle/memory_trace.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lifecycle.errors import UsageError

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}

# bitsandbytes constants (bitsandbytes/functional.py)
NF4_BLOCK = 64                # NF4: one absmax per 64 weights
NF4_DQ_BLOCK = 256            # double quantization: one fp32 absmax per 256 absmax blocks


class NoClosedForm(UsageError):
    """The config is of a family without a closed form here (the generic path may still count it)."""

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
    qk_norm: bool = False    # qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int = 0  # mistral-style local attention (0: none); longer sequences go to the generic path
    config_json: str = ""    # arch "generic": the config, counted from the real module (lifecycle/memory_trace.py)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def shape_from_config(cfg: dict) -> Shape:
    """Read a Llama-style (llama/mistral/qwen2/qwen3) or GPT-2 config; name every missing field at once.

    Any other model_type raises NoClosedForm (a UsageError).
    """
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
                     attn_dropout=float(cfg.get("attention_dropout", 0.0)), model_type=mt or "llama",
                     qk_norm=mt == "qwen3", sliding_window=_window(cfg))
    raise NoClosedForm(f"model_type {mt or '(none)'!r} is not supported; supported: {', '.join(LLAMA_TYPES)}, gpt2 "
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


# LoRA target roles; "generic" models adapt every nn.Linear but the output head (peft's "all-linear").
LORA_ROLES = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("attn", "proj", "fc", "fc_proj"),
              "generic": ("linear",)}


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
    if sh.qk_norm:
        out += [ParamSpec(p + "self_attn.q_norm.weight", sh.head_dim, kind="norm", layer=i),
                ParamSpec(p + "self_attn.k_norm.weight", sh.head_dim, kind="norm", layer=i)]
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


# Per-layer norm vectors beyond the closed form's two (h each): (extra h-sized, head_dim-sized, q+kv-sized).
_NORMS = {"gemma": (0, 0, 0), "gemma2": (2, 0, 0), "gemma3_text": (2, 2, 0), "qwen3": (0, 2, 0), "qwen3_moe": (0, 2, 0),
          "olmo2": (0, 0, 1), "llama": (0, 0, 0), "mistral": (0, 0, 0), "qwen2": (0, 0, 0), "mixtral": (0, 0, 0),
          "phi3": (0, 0, 0)}


def params_formula(cfg: dict) -> int:
    """Parameters of a published decoder's config from its numbers alone (tied embeddings once).

    Covers the families of lifecycle/presets.PUBLISHED: Llama-style blocks with GQA
    (q, k, v, o), a gated MLP (gate, up, down; Phi-3 fuses them, same count) or
    routed experts (E x 3 matrices + an E x h router; Qwen3-MoE's dense layers
    per decoder_sparse_step / mlp_only_layers), two norms per layer plus Gemma 2/3's
    sandwich norms and the per-head QK-norm of Qwen3 and Gemma 3 (OLMo 2's over
    the whole q and k). Anything else raises NoClosedForm.
    """
    mt = str(cfg.get("model_type", ""))
    if mt == "gpt2":
        return count_params(shape_from_config(cfg))
    if mt not in _NORMS:
        raise NoClosedForm(f"no parameter formula for model_type {mt!r}")
    h, layers, a, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads") or a
    d = cfg.get("head_dim") or h // a
    attn = 2 * h * a * d + 2 * h * kv * d
    if cfg.get("attention_bias") or mt == "qwen2":
        attn += a * d + 2 * kv * d + (h if cfg.get("attention_bias") else 0)
    dense = 3 * h * cfg["intermediate_size"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    extra_h, extra_d, extra_qk = _NORMS[mt]
    norms = (2 + extra_h) * h + extra_d * d + extra_qk * (a + kv) * d
    total = 0
    for i in range(layers):
        sparse = experts > 1 and (mt != "qwen3_moe" or (i not in (cfg.get("mlp_only_layers") or [])
                                                         and (i + 1) % (cfg.get("decoder_sparse_step") or 1) == 0))
        mi = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        total += attn + norms + (experts * 3 * h * mi + experts * h if sparse else dense)
    tied = cfg.get("tie_word_embeddings", mt in ("gemma", "gemma2", "gemma3_text"))
    return total + V * h * (1 if tied else 2) + h


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




def _window(cfg: dict) -> int:
    """The sliding window a Llama-style config really uses (qwen2/qwen3 only with use_sliding_window)."""
    w = cfg.get("sliding_window")
    if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or cfg.get("use_sliding_window") is False:
        return 0
    if str(cfg.get("model_type")) in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        return 0
    return w


# ---------------------------------------------------------------------------
# Precision regimes: which dtype each kind of tensor has
# ---------------------------------------------------------------------------
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


def dtypes_for(regime: str, style: str, half: int, method: str, trains: bool, stage: str = "sft") -> dict[str, Any]:
    """Bytes per element of base weights (pdt), adapters (adt), 4-bit compute (qcompute), and whether autocast runs.

    fp32: everything fp32. mixed/autocast: weights that train are fp32 (they are the
    master copy) and autocast computes in 16-bit; frozen weights (LoRA base,
    reference and reward models) are stored in 16-bit, as loading with
    torch_dtype=bfloat16 does. mixed/master: 16-bit weights, fp32 master copy in the
    optimizer, no autocast. pure: 16-bit weights and states. LoRA adapters are fp32
    except under mixed/master (peft keeps adapters fp32 by default: autocast_adapter_dtype).

    QLoRA, as the stages load it (lifecycle.modeling.load_for_training): the 4-bit
    layers compute in bf16 (its BitsAndBytesConfig), and peft's
    prepare_model_for_kbit_training casts every weight it did not quantize
    (embeddings, output head, norms) to fp32, so the residual stream is fp32 too.
    TRL's SFTTrainer and RewardTrainer then cast the trainable tensors of a
    quantized model to bf16 (trl 1.16, trainer/sft_trainer.py and
    reward_trainer.py: "the PEFT adapter weights are converted to bf16"); without
    autocast (fp32) the stages keep them fp32. PPO, our own loop, keeps peft's fp32.
    `pure` keeps its own table (16-bit weights, fp32 adapters): no stage runs it.
    """
    autocast = regime == "mixed" and style == "autocast" and trains
    full_train = method == "full" and trains
    if regime == "fp32":
        pdt = 4
    elif autocast and full_train:
        pdt = 4
    else:
        pdt = half
    adt = half if (regime == "mixed" and style == "master") else 4
    qcompute = 4 if regime == "fp32" else half
    if method == "qlora" and trains and regime != "pure":
        pdt, qcompute = 4, 2
        if regime == "mixed" and stage in ("sft", "reward"):
            adt = 2
    return dict(pdt=pdt, adt=adt, qcompute=qcompute, autocast=autocast)
