"""The estimator's generic path: count the real architecture on fake tensors, for any decoder-only causal LM.

For a model_type without a closed form (lifecycle/memory_arch.py), the estimate
comes from transformers' own module built from the config inside
torch's FakeTensorMode: every tensor has a shape, a dtype and a (CPU) device
but no memory, so a 70B model is built and run in seconds on any machine and
nothing is downloaded.

  parameters  `model.named_parameters()` (tied weights once), each tagged with
              what the closed form needs: a quantizable / LoRA-targetable linear
              weight (every nn.Linear but the output head: peft's "all-linear" and
              bitsandbytes' 4-bit conversion skip the head), its bias, the input
              embedding, the output head, a norm or other tensor (expert
              tensors of a mixture of experts are 3-D parameters, not nn.Linear:
              LoRA "all-linear" leaves them frozen and 4-bit loading keeps them in 16-bit).
  activations one training forward under the stage's precision (CPU autocast to
              16-bit where the real step autocasts) with peft's LoRA layers
              applied, every tensor autograd saves caught by
              torch.autograd.graph.saved_tensors_hooks and counted once per
              storage, parameters excluded: what `--measure` counts in a real
              step, with the same split into 16-bit weight copies, logits and
              the rest.

Scaling: a fake forward costs the same at any size, so the trace runs at the
requested sequence length. For batch sizes it traces batch 1 and 2 and
extrapolates linearly (at a fixed sequence length every saved tensor is either
per sequence or shared by the batch), which is what the largest-micro-batch
search uses.

Assumptions, stated where they differ from a real step:
  - PyTorch's CPU dispatch rules (fake tensors live on the CPU): CPU autocast
    lists, the CPU SDPA kernel choice, dropout masks in the input dtype. On CUDA
    the closed-form families apply CUDA rules; here expect a few percent.
  - Mixture of experts run transformers' default grouped experts kernel: every
    (token, expert) pair of the top-k routing is processed once, so the bytes do
    not depend on how tokens are routed (uniform or not). The fallback kernel
    is traced (the fused one needs a GPU); its per-expert offsets (a few bytes)
    are kept out of autograd's saved tensors and not counted.
  - QLoRA: activations are traced with LoRA on 16-bit frozen linear layers (4-bit
    kernels cannot run on fake tensors) and every other weight in fp32, as
    peft's prepare_model_for_kbit_training leaves them; 4-bit layers save only
    their packed weight, a parameter, like a frozen 16-bit one. A real 4-bit
    layer returns its input's dtype (fp32 here), a 16-bit one bf16, so the
    traced MLP intermediates are half their real size.
  - sft: TRL's SFTTrainer computes its loss through the fused chunked LM head
    (`add_fused_lm_head`), which is what is traced for that stage: no logits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lifecycle.memory_arch import ParamSpec

HALF = {2: torch.bfloat16, 4: torch.float32}
_SKIP_KEYS = ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config",
              "_name_or_path")


class CannotTrace(Exception):
    """transformers cannot build or run this config as a causal LM (message: the reason, one line)."""


def hf_config(cfg: dict, *, attn: str = "sdpa", head: str = "lm"):
    """A transformers config object from a config dict (no download; remote code never runs)."""
    from transformers import AutoConfig

    d = {k: v for k, v in cfg.items() if k not in _SKIP_KEYS}
    mt = d.pop("model_type", None) or ("gpt2" if "n_embd" in d else "llama")
    try:
        conf = AutoConfig.for_model(mt, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise CannotTrace(f"transformers has no config class for it: {str(e).splitlines()[0][:160]}") from None
    conf.use_cache = False
    if head == "score":
        conf.num_labels = 1
        conf.pad_token_id = int(getattr(text_config(conf), "vocab_size", 1)) - 1   # never among the measured ids
    conf._attn_implementation = attn
    return conf


def text_config(conf):
    """The decoder's own config (multimodal wrappers keep it under text_config)."""
    get = getattr(conf, "get_text_config", None)
    return get() if get else conf


@contextlib.contextmanager
def _quiet():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


@contextlib.contextmanager
def _fake_friendly():
    """Two data-dependent checks in transformers, decided as in a real unpadded training batch.

    - packed-sequence detection reads position_ids' values; a training batch
      without packing returns None there (under fake tensors transformers
      would assume packing and build a 4-D mask that the real step never has);
    - the fused grouped-mm kernel has no fake implementation for fp32 on CPU;
      the fallback kernel saves the same (input, weight) for backward.
    """
    import transformers.masking_utils as mu
    import transformers.integrations.moe as moe

    saved = mu.find_packed_sequence_indices, moe._can_use_grouped_mm
    mu.find_packed_sequence_indices = lambda position_ids: None
    moe._can_use_grouped_mm = lambda *a, **k: False
    try:
        yield
    finally:
        mu.find_packed_sequence_indices, moe._can_use_grouped_mm = saved


def _model_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM


def build_fake(cfg: dict, *, head: str, attn: str, pdt: int, mode):
    """The model built inside `mode` (a FakeTensorMode for a trace, the meta device for a parameter table);
    eager attention where the class has no SDPA."""
    cls = _model_class(head)
    for impl in dict.fromkeys((attn, "eager")):
        conf = hf_config(cfg, attn=impl, head=head)
        try:
            with _quiet(), mode:
                return cls.from_config(conf, dtype=HALF[pdt], attn_implementation=impl), impl
        except ValueError as e:
            if "attention implementation" in str(e) and impl != "eager":
                continue
            raise CannotTrace(f"transformers cannot build it: {str(e).splitlines()[0][:160]}") from None
        except (KeyError, TypeError, AttributeError, RuntimeError, AssertionError, NotImplementedError) as e:
            raise CannotTrace(f"transformers cannot build it: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    raise CannotTrace("no attention implementation builds")  # pragma: no cover


def _is_linear(m) -> bool:
    return isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"


def _output_head(model):
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out if out is not None else getattr(model, "score", None)


def param_specs(model, head: str) -> list[ParamSpec]:
    """Every parameter tensor once (tied ones once), tagged as the closed form's table is."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = _output_head(model)
    layers = _decoder_layers(model)
    layer_of = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = i
    owner = {}
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (m, n))
    specs, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        m, local = owner[id(p)]
        layer = layer_of.get(id(p), -1)
        rows, cols = (p.shape[0], p[0].numel()) if p.dim() > 1 else (p.numel(), 1)
        if m is out:
            kind = "score" if head == "score" else "head"
            if m is inp:
                kind = "embed"      # tied: the embedding is the head
        elif m is inp:
            kind = "embed"
        elif _is_linear(m) and local == "weight":
            kind = "linear"
            if type(m).__name__ == "Conv1D":
                rows, cols = p.shape[1], p.shape[0]     # Conv1D stores (in, out)
        elif _is_linear(m) and local == "bias":
            kind = "bias"
        elif p.dim() == 1:
            kind = "norm"
        else:
            kind = "other"
        specs.append(ParamSpec(name, int(rows), int(cols), kind=kind, layer=layer,
                               role="linear" if kind == "linear" else ""))
    return specs


def _decoder_layers(model) -> list:
    """The decoder blocks: transformers marks each with GradientCheckpointingLayer."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:                                        # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class _Casts(TorchDispatchMode):
    """Remembers every copy made of a parameter (autocast's 16-bit casts), by storage."""

    def __init__(self, param_keys: set):
        super().__init__()
        self.param_keys, self.copies = param_keys, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0]) and torch.is_tensor(out):
            src = args[0]
            if _key(src) in self.param_keys and src.numel() == src.untyped_storage().nbytes() // src.element_size():
                self.copies[_key(out)] = (out, self.param_keys[_key(src)])
        return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass(frozen=True)
class Settings:
    """What the trace depends on besides the config (hashable: traces are cached)."""

    head: str            # lm | score
    method: str          # full | lora | qlora
    pdt: int             # bytes of the base weights
    adt: int             # bytes of LoRA adapters
    half: int            # 16-bit compute dtype bytes (2)
    autocast: bool
    attn: str
    ckpt: bool
    lora_r: int
    lora_dropout: float
    loss: str = "full"   # full: the model's logits and cross-entropy | fused: TRL's chunked LM head (sft)


def _apply_lora(model, st: Settings, head: str):
    from peft import LoraConfig, get_peft_model

    from lifecycle.modeling import is_moe

    # As the stages load it (modeling.lora_config): peft takes no dropout on fused expert weights.
    dropout = 0.0 if is_moe(model.config) else st.lora_dropout
    lcfg = LoraConfig(r=st.lora_r, lora_alpha=2 * st.lora_r, lora_dropout=dropout, target_modules="all-linear",
                      task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
    # peft moves and casts each new adapter with Module.to, which swaps parameters in place: fake tensors
    # refuse that (their fake mode holds weak references), so cast by replacing the parameters instead
    to = torch.nn.Module.to

    def to_by_replacing(self, *args, **kwargs):
        _, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            for m in self.modules():
                for k, p in list(m._parameters.items()):
                    if p is not None and p.is_floating_point() and p.dtype != dtype:
                        m._parameters[k] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        return self                      # every fake tensor already lives on the (fake) CPU

    torch.nn.Module.to = to_by_replacing
    try:
        model = get_peft_model(model, lcfg)
    finally:
        torch.nn.Module.to = to
    if st.adt != 4:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(HALF[st.adt])
    return model


def _rehome(model, mode: FakeTensorMode) -> None:
    """Give tensors that peft deep-copied (modules_to_save) back to `mode`: a copy gets a fake mode of its own."""
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for k, t in list(store.items()):
                if t is not None and getattr(t, "fake_mode", mode) is not mode:
                    new = torch.empty(t.shape, dtype=t.dtype)
                    store[k] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if store is m._parameters else new


def add_trl_fused_head(model) -> None:
    """Patch `model` as TRL's SFTTrainer does (trl 1.16, trainer/sft_trainer.py): its loss comes from the
    chunked log-prob head (trl/kernels/chunked_logprob.py) instead of the full logits."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))


def _fake_mode() -> FakeTensorMode:
    """A FakeTensorMode without its dispatch cache: with the cache on, building some models (Gemma 3's
    rotary init, a reward head) crashed the process in torch 2.13 when several traces ran in one process."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(fake_tensor_cache_enabled=False):
        return FakeTensorMode()


def _trace_once(cfg: dict, st: Settings, b: int, s: int, per_layer: bool = False) -> dict:
    mode = _fake_mode()
    model, impl = build_fake(cfg, head=st.head, attn=st.attn, pdt=st.pdt, mode=mode)
    with _quiet(), mode, _fake_friendly():
        if st.method != "full":
            for p in model.parameters():
                p.requires_grad_(False)
            if st.method == "qlora":   # 4-bit layers read as 16-bit ones; everything else stays fp32 (st.pdt)
                head = _output_head(model)
                for m in model.modules():
                    if _is_linear(m) and m is not head:
                        m.weight.data = m.weight.data.to(HALF[st.half])
            model = _apply_lora(model, st, st.head)
            _rehome(model, mode)
            if st.head == "score":
                for n, p in model.named_parameters():
                    if "score" in n:
                        p.requires_grad_(True)
        if st.ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        named = list(model.named_parameters())
        pkeys = {_key(p): (p.numel(), p.requires_grad) for _, p in named}
        vocab = int(getattr(text_config(model.config), "vocab_size", 0) or 0)
        saved: dict[int, torch.Tensor] = {}
        layer_bytes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            k = _key(t)
            if k not in pkeys and k not in saved:
                saved[k] = t
            return t

        hooks = []
        if per_layer:
            mark = {}

            def pre(mod, args):
                mark[id(mod)] = sum(t.untyped_storage().nbytes() for t in saved.values())

            def post(mod, args, out):
                layer_bytes.append(sum(t.untyped_storage().nbytes() for t in saved.values()) - mark[id(mod)])

            for layer in _decoder_layers(model):
                hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        ids = torch.zeros(b, s, dtype=torch.long)
        batch = dict(input_ids=ids) if st.head == "score" else dict(input_ids=ids, labels=ids)
        fused = st.loss == "fused" and st.head == "lm"
        hidden: list[torch.Tensor] = []
        if fused:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            add_trl_fused_head(base)
            batch["fused_lm_head"] = True
            hooks.append(base.base_model.register_forward_hook(lambda m, a, o: hidden.append(o.last_hidden_state)))
        casts = _Casts(pkeys)
        ac = torch.autocast("cpu", dtype=HALF[st.half]) if st.autocast else contextlib.nullcontext()
        try:
            with casts, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac:
                out = model(**batch)
                if fused:   # SFTTrainer.compute_loss: the summed negative log-probs over the labelled tokens
                    (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
        except Exception as e:  # noqa: BLE001 - any failure of a foreign forward means: cannot trace
            raise CannotTrace(f"its forward does not run on fake tensors: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
        finally:
            for h in hooks:
                h.remove()
        rows = dict(copy=0, act=0, logits=0)
        if fused:
            from lifecycle.memory_sim import fused_head_backward_bytes

            w = model.get_output_embeddings().weight
            y = hidden[-1]
            cdt = HALF[st.half] if st.autocast else y.dtype
            rows["loss_backward"] = fused_head_backward_bytes(
                b * (s - 1), y.shape[-1], vocab, y.element_size(), w.element_size(),
                torch.empty(0, dtype=cdt).element_size(), w.requires_grad)
        logits_key = _key(out.logits) if not fused else None
        for k, t in saved.items():
            nbytes = t.untyped_storage().nbytes()
            if k in casts.copies and t.dtype in (torch.bfloat16, torch.float16):
                rows["copy"] += nbytes
            elif k == logits_key or (t.dim() >= 1 and vocab and t.shape[-1] == vocab and t.is_floating_point()):
                rows["logits"] += nbytes
            else:
                rows["act"] += nbytes
        if not fused and logits_key not in saved:
            rows["held_logits"] = out.logits.untyped_storage().nbytes()
        cache = sum(t.untyped_storage().nbytes() for k, (t, (_, trains)) in casts.copies.items()
                    if trains and k not in saved)
        rows["cache"] = cache if st.autocast else 0
        rows["layers"] = layer_bytes
        rows["attn"] = impl
    return rows


@functools.lru_cache(maxsize=64)
def _trace_cached(cfg_json: str, st: Settings, b: int, s: int, per_layer: bool) -> dict:
    return _trace_once(json.loads(cfg_json), st, b, s, per_layer)


def trace(cfg: dict, st: Settings, b: int, s: int, per_layer: bool = False) -> dict:
    """Saved-tensor bytes of one forward at batch b: traced at b = 1 and 2, linear in b beyond."""
    key = json.dumps(cfg, sort_keys=True)
    if b <= 2:
        return _trace_cached(key, st, b, s, per_layer)
    r1, r2 = _trace_cached(key, st, 1, s, per_layer), _trace_cached(key, st, 2, s, per_layer)
    out = dict(r2)
    for k in ("copy", "act", "logits", "held_logits", "cache", "loss_backward"):
        if k in r1 or k in r2:
            a, c = r1.get(k, 0), r2.get(k, 0)
            out[k] = a + (b - 1) * (c - a)
    out["layers"] = [a + (b - 1) * (c - a) for a, c in zip(r1["layers"], r2["layers"])]
    return out


def _meta_device():
    """Where the parameter tables are built: the meta device (shapes, dtypes and tied identities, no storage).
    Only the activation trace needs fake tensors; building every table under a FakeTensorMode as well crashed
    long-lived processes (torch 2.13, segfault inside FakeTensor.__new__ after many builds)."""
    return torch.device("meta")


@functools.lru_cache(maxsize=16)
def _params_cached(cfg_json: str, head: str) -> tuple:
    model, _ = build_fake(json.loads(cfg_json), head=head, attn="sdpa", pdt=4, mode=_meta_device())
    conf = text_config(model.config)
    return tuple(param_specs(model, head)), _dims(conf)


def params(cfg: dict, head: str = "lm") -> tuple[list[ParamSpec], dict]:
    """(parameter table, the config's dimensions for the KV-cache and inference formulas)."""
    specs, dims = _params_cached(json.dumps(cfg, sort_keys=True), head)
    return list(specs), dict(dims)


@functools.lru_cache(maxsize=16)
def _lora_cached(cfg_json: str, head: str, r: int) -> tuple:
    mode = _meta_device()
    model, _ = build_fake(json.loads(cfg_json), head=head, attn="sdpa", pdt=4, mode=mode)
    st = Settings(head=head, method="lora", pdt=4, adt=4, half=2, autocast=False, attn="sdpa", ckpt=False, lora_r=r,
                  lora_dropout=0.0)
    with _quiet(), mode:
        model = _apply_lora(model, st, head)
    return tuple(ParamSpec(n, p.shape[0], p[0].numel() if p.dim() > 1 else 1, kind="lora")
                 for n, p in model.named_parameters() if "lora_" in n)


def lora_params(cfg: dict, head: str, r: int) -> list[ParamSpec]:
    """The adapter tensors peft adds with target_modules="all-linear" (rank r), as on the real module."""
    return list(_lora_cached(json.dumps(cfg, sort_keys=True), head, r))


def _dims(conf) -> tuple:
    h = int(getattr(conf, "hidden_size", 0) or getattr(conf, "n_embd", 0) or 0)
    heads = int(getattr(conf, "num_attention_heads", 0) or getattr(conf, "n_head", 0) or 1)
    kv = int(getattr(conf, "num_key_value_heads", 0) or heads)
    hd = int(getattr(conf, "head_dim", 0) or (h // heads if heads else 0))
    layers = int(getattr(conf, "num_hidden_layers", 0) or getattr(conf, "n_layer", 0) or 0)
    inter = int(getattr(conf, "intermediate_size", 0) or getattr(conf, "n_inner", 0) or 4 * h)
    maxpos = int(getattr(conf, "max_position_embeddings", 0) or getattr(conf, "n_positions", 0) or 4096)
    return tuple(dict(hidden=h, heads=heads, kv_heads=kv, head_dim=hd, layers=layers, intermediate=inter,
                      vocab=int(getattr(conf, "vocab_size", 0) or 0), max_positions=maxpos,
                      tied=bool(getattr(conf, "tie_word_embeddings", False))).items())
