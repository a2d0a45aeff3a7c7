"""What autograd keeps for backward in a Llama-style or GPT-2 forward, simulated op by op: no torch.

Closed forms such as Korthikanti et al. (2022) count what an idealised GPT
layer keeps for backward. Hugging Face models keep more (every nn.Linear under
autocast saves its own 16-bit cast of its input, GELU-tanh keeps four
intermediates, RMSNorm keeps fp32 copies, the residual stream stays fp32 under
autocast, ...). So instead of a fixed per-layer constant, `_Graph` walks the
forward pass of transformers' LlamaForCausalLM (also Mistral, Qwen2 and Qwen3
with its per-head QK-norm) / GPT2LMHeadModel with symbolic tensors and applies
PyTorch's rules for what each op saves for backward (only what the gradient of
an input that requires grad needs), the autocast casting rules (which ops run
in 16-bit, which in fp32, which casts are cached) and storage sharing (views
and tensors saved by two ops count once). The rules were read off
`torch.autograd.graph.saved_tensors_hooks` and are checked against
measurement (tests/test_memory.py) and against the generic path, which runs
the real module on fake tensors (tests/test_memory_families.py).
docs/memory.md writes the result out as formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lifecycle.memory_arch import Shape, dtypes_for

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
    loss: str = "full"        # full: the model's logits and cross-entropy | fused: TRL's chunked LM head (sft)


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
        if run.head == "score":   # trained in full, or peft's trainable copy in the adapters' dtype
            self.head = _param(sh.hidden, run.pdt if base_t else run.adt, True)
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
        if sh.qk_norm:
            out["q_norm"] = _param(sh.head_dim, run.pdt, base_t)
            out["k_norm"] = _param(sh.head_dim, run.pdt, base_t)
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
    q, k = _proj(g, run, y, L["q"]), _proj(g, run, y, L["k"])
    if sh.qk_norm:                                                 # qwen3: RMSNorm over each head
        q, k = g.rmsnorm(q, L["q_norm"], sh.head_dim), g.rmsnorm(k, L["k_norm"], sh.head_dim)
    q, k = _rope(g, q, cos, sin), _rope(g, k, cos, sin)
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


# TRL's fused LM head (trl 1.16: trl/trainer/utils.py `add_fused_lm_head`, trl/kernels/chunked_logprob.py
# `ChunkedLogProbFunction`). SFTTrainer patches the model so that its loss never builds the (tokens, vocab)
# logits: the head projects TOKEN_CHUNK_SIZE tokens x CHUNK_VOCAB vocabulary entries at a time into one
# reused buffer, folds each tile into an online log-sum-exp, and recomputes the tiles in backward.
TRL_TOKEN_CHUNK = 4096     # chunked_logprob.TOKEN_CHUNK_SIZE
TRL_CHUNK_VOCAB = 32768    # trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE (the buffer is this wide at any vocabulary)


def _fused_head(g: _Graph, run: _Run, y: _T, w: _T) -> int:
    """Save what the fused head keeps for backward; return its backward transient in bytes.

    N = b·(s-1) positions are scored (every next-token label; a completion-only loss
    scores fewer on CUDA, so this is the upper bound). The function keeps its input
    hidden states (one copy of N x h in their own dtype), the N target ids (int64),
    log Z and the entropy (fp32 each); the head weight is a parameter. On CUDA
    (Triton) only labelled positions are gathered (`hidden[mask]`: the bool mask is
    kept, once, by the gather and by masked_scatter); on the CPU every position is
    scored, `hidden[:, :-1].reshape(-1, h)` (a copy unless b = 1, where it is the
    hidden states themselves), and two masked_fill keep a bool mask each. Both
    loss divisions (the model's and SFTTrainer's) keep a 0-dim int64 count.
    Backward: fp32 grad of the hidden states, the (chunk x vocab-chunk) tile, the
    casts of a hidden chunk and a weight chunk to the compute dtype, and, for a
    trainable head that is not fp32, its fp32 gradient accumulator.
    """
    sh, b, s = run.sh, run.b, run.s
    h, n = sh.hidden, b * (s - 1)
    cdt = g.half if g.autocast else y.dt
    if y.grad or w.trainable:
        if g.device == "cuda":
            g.save(g.new(b * (s - 1), 1, False), "misc")      # the label mask (bool)
            g.save(g.new(n * h, y.dt, False), "act")           # hidden[mask]
        else:
            g.save(y if b == 1 else g.new(n * h, y.dt, False), "act")
            g.save(g.new(n, 1, False), "misc")                 # ~mask, for log_probs
            g.save(g.new(n, 1, False), "misc")                 # ~mask, for the entropy
        g.save(g.new(n, 8, False), "misc")                     # target ids
        g.save(g.new(n, 4, False), "misc")                     # log Z
        g.save(g.new(n, 4, False), "misc")                     # entropy
        g.save(g.new(1, 8, False), "misc")                     # the model's loss divisor
        g.save(g.new(1, 8, False), "misc")                     # SFTTrainer's loss divisor
    return fused_head_backward_bytes(n, h, sh.vocab, y.dt, w.dt, cdt, w.trainable)


def fused_head_backward_bytes(n: int, h: int, vocab: int, hdt: int, wdt: int, cdt: int, head_trains: bool) -> int:
    """The backward transient of TRL's fused head over n scored positions (bytes; dtypes in bytes per element)."""
    rows = min(n, TRL_TOKEN_CHUNK)
    temp = 4 * n * h + rows * TRL_CHUNK_VOCAB * cdt                   # grad_hidden (fp32), the tile buffer
    temp += rows * h * cdt if hdt != cdt else 0                       # hidden chunk in the compute dtype
    temp += min(vocab, TRL_CHUNK_VOCAB) * h * cdt if wdt != cdt else 0   # weight chunk in the compute dtype
    temp += n * h * hdt if hdt != 4 else 0                            # grad_hidden.to(hidden.dtype)
    if head_trains and wdt != 4:
        temp += vocab * h * (4 + wdt)                                 # fp32 accumulator, then its cast
    return temp


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
    loss_backward = 2 * 4 * tok * sh.vocab if run.head == "lm" else 0   # grads of the fp32 log-probs and the logits
    if run.head == "score":
        logits = g.linear(y, M.head, h, 1)
        held = b * logits.dt                # the pooled (last-token) scores the output holds
        g.cat = "misc"
        if logits.grad:
            g.save(g.new(b, 8, False))      # logits[arange(b), last_index]: both index tensors
            g.save(g.new(b, 8, False))
    elif run.loss == "fused":
        loss_backward = _fused_head(g, run, y, M.head)
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
    tot["loss_backward"] = loss_backward
    tot["recompute"] = recompute
    tot["saved_copies"] = tot.get("copy", 0)
    return tot


def activation_rows(sh: Shape, *, b: int, s: int, method: str, regime: str, style: str, half: int, attn: str,
                     ckpt: bool, device: str, lora_r: int, lora_roles: tuple, lora_dropout: float, dropout: bool,
                     head: str = "lm", stage: str = "sft") -> dict[str, int]:
    """The forward/backward rows of one trained model (bytes): saved tensors by category plus the transients.

    `stage` picks the loss: sft runs TRL's fused LM head (no logits), pretrain and PPO's actor
    the model's own logits and cross-entropy, reward and the critic a score head."""
    d = dtypes_for(regime, style, half, method, True, stage)
    run = _Run(sh=sh, b=b, s=s, attn=attn, ckpt=ckpt, device=device, autocast=d["autocast"], half=half, pdt=d["pdt"],
               adt=d["adt"], qcompute=d["qcompute"], trainable_base=(method == "full"),
               quant=(method == "qlora"), lora_roles=lora_roles if method != "full" else (), lora_r=lora_r,
               lora_dropout=lora_dropout, head=head, dropout=dropout,
               loss="fused" if (stage == "sft" and head == "lm") else "full")
    t = _forward(run)
    act = t.get("act", 0) + t.get("attn_s2", 0) + t.get("lora", 0) + t.get("misc", 0)
    logits_held = t["held_logits"]
    return {
        "weight_copies_bytes": t.get("copy", 0),
        "activations_bytes": act,
        "logits_bytes": t.get("logits", 0) + logits_held,
        "loss_backward_bytes": t["loss_backward"],
        "recompute_bytes": t["recompute"],
        "autocast_cache_bytes": max(0, t.get("cache", 0) - t.get("copy", 0)) if run.autocast else 0,
        "attn_s2": t.get("attn_s2", 0),
        "lora_act": t.get("lora", 0),
    }
