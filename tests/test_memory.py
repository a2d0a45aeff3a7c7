"""The memory estimator against measurement, published closed forms and published parameter counts.

Measurement: lifecycle.memory_measure runs one real training step of a tiny
model on the CPU and counts bytes from the tensors themselves (parameters,
.grad, optimizer.state, and the tensors autograd saves for backward through
saved_tensors_hooks, once per storage). The estimate (pure arithmetic) must
agree byte for byte, except GPT-2 under QLoRA, whose measured activations vary
from run to run (866,636 and 867,404 bytes for one case, against 868,172
estimated: a 0.1-0.2 % gap not yet explained), so that row gets 1 %.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from lifecycle import memory, presets
from lifecycle.errors import UsageError

GB = 1e9

# Tiny configs: every width differs (hidden 64, q 64, kv 32, MLP 96/256, vocab 320/256)
# so that the measurement can tell logits (last dim = vocab) from everything else.
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False)
GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=64)  # dropout 0.1 as published
QWEN = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=True)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2, "qwen2": QWEN}
STATE_ROWS = ("params_bytes", "lora_params_bytes", "quant_constants_bytes", "grads_bytes", "optimizer_bytes")
SAVED_ROWS = ("weight_copies_bytes", "activations_bytes", "logits_bytes")


@pytest.fixture(scope="module")
def mm():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    torch.set_num_threads(1)   # tiny models: one thread is fastest and leaves the other core alone
    from lifecycle import memory_measure

    return memory_measure


def _agree(mm, config, **kw):
    kw = dict(dict(stage="sft", method="full", lora_r=4, dtype="bf16", optimizer="adamw", batch_size=2, seq_len=24,
                   grad_ckpt="none", attn="sdpa"), **kw)
    est = memory.estimate(config, device="cpu", **kw)
    meas = mm.measure(config, device="cpu", **kw)
    known_gap = config["model_type"] == "gpt2" and kw["method"] == "qlora" and kw.get("precision") != "pure"
    for row in STATE_ROWS + SAVED_ROWS:
        e, m = est.rows.get(row, 0), meas["rows"].get(row, 0)
        tol = 0.01 if (known_gap and row == "activations_bytes") else 0.0
        assert abs(e - m) <= tol * m, f"{row}: estimated {e} vs measured {m} ({kw})"
    assert est.n_trainable == meas["n_trainable"]
    return est, meas


# ---------------------------------------------------------------------------
# estimate vs one measured training step
# ---------------------------------------------------------------------------
MATRIX = list(itertools.product(("llama", "gpt2"), ("full", "lora", "qlora"), ("none", "full"), ("fp32", "bf16"),
                                ("sdpa", "eager")))


@pytest.mark.parametrize("arch,method,ckpt,dtype,attn", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_estimate_matches_measurement(mm, arch, method, ckpt, dtype, attn):
    _agree(mm, CONFIGS[arch], method=method, grad_ckpt=ckpt, dtype=dtype, attn=attn)


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(optimizer="adamw8bit")),            # uint8 states + absmax per 256; small tensors stay fp32
    ("gpt2", dict(optimizer="sgd", dtype="fp32")),     # momentum only
    ("llama", dict(optimizer="adafactor", method="lora")),
    ("llama", dict(precision="pure")),                 # bf16 weights and states, no autocast
    ("gpt2", dict(precision="pure", method="qlora", attn="eager")),
    ("qwen2", dict(method="lora", grad_ckpt="full")),  # GQA 4:1, tied embeddings, q/k/v biases
    ("qwen2", dict(batch_size=3, seq_len=40)),
    ("llama", dict(method="lora", lora_dropout=0.1)),
    ("llama", dict(stage="reward")),                    # score head, chosen + rejected in one forward
], ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_more_settings_match_measurement(mm, arch, kw):
    _agree(mm, CONFIGS[arch], **kw)


def test_gpt2_124m_saved_tensors_dwarf_the_per_layer_formula():
    """The issue's observation: GPT-2 124M, batch 1 x 512 under autocast keeps ~1.0-1.1 GB of saved tensors
    (logits and weight copies included), far above the 0.35 GB the per-layer 34*s*b*h formula gives.
    A step with the model's own logits and cross-entropy: pretrain (sft's fused head keeps no logits)."""
    cfg, _ = memory.load_model_config("gpt2")
    est = memory.estimate(cfg, stage="pretrain", batch_size=1, seq_len=512, device="cpu")
    saved = est["weight_copies_bytes"] + est["activations_bytes"] + est["logits_bytes"]
    assert 1.0 * GB <= saved <= 1.25 * GB
    formula = memory.korthikanti_layer_bytes(512, 1, 768, 12) * 12   # 34sbh + 5as^2b per layer, 12 layers
    assert formula / GB == pytest.approx(0.35, abs=0.01)
    assert saved > 2.8 * formula


# ---------------------------------------------------------------------------
# published closed forms
# ---------------------------------------------------------------------------
def test_mixed_precision_adam_is_2_2_12_bytes_per_parameter():
    """ZeRO paper sec. 3.1: fp16 weights (2) + fp16 grads (2) + fp32 master, momentum, variance (K=12)."""
    cfg, _ = memory.load_model_config("llama-2-7b")
    psi = memory.PUBLISHED_PARAMS["llama-2-7b"]
    est = memory.estimate(cfg, dtype="bf16", precision="mixed", mp_style="master")
    assert est["params_bytes"] == 2 * psi
    assert est["grads_bytes"] == 2 * psi
    assert est["master_bytes"] + est["optimizer_bytes"] == 12 * psi
    assert est["master_bytes"] == 4 * psi
    # autocast keeps the same 16 bytes as 4 + 4 + 8 (fp32 weights are the master copy), plus 2-byte copies
    auto = memory.estimate(cfg, dtype="bf16", stage="pretrain")
    assert (auto["params_bytes"], auto["grads_bytes"], auto["optimizer_bytes"]) == (4 * psi, 4 * psi, 8 * psi)
    assert auto["weight_copies_bytes"] == 2 * (psi - 32000 * 4096 - 4096 * 65)   # every matrix but the embedding
    fp32 = memory.estimate(cfg, dtype="fp32")
    assert (fp32["params_bytes"], fp32["grads_bytes"], fp32["optimizer_bytes"]) == (4 * psi, 4 * psi, 8 * psi)
    pure = memory.estimate(cfg, dtype="bf16", precision="pure")
    assert (pure["params_bytes"], pure["grads_bytes"], pure["optimizer_bytes"], pure["master_bytes"]) == (
        2 * psi, 2 * psi, 4 * psi, 0)


def test_zero_paper_example_7_5b_on_64_gpus():
    """Rajbhandari et al. 2019, Fig. 1: 7.5B parameters, K=12, Nd=64: 120 GB -> 31.4 / 16.6 / 1.9 GB."""
    expect = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expect.items():
        assert memory.zero_model_state_bytes(7.5e9, 64, stage) / GB == pytest.approx(gb, abs=0.05)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_estimate_shards_like_zero(stage):
    cfg, _ = memory.load_model_config("llama-2-7b")
    psi = memory.PUBLISHED_PARAMS["llama-2-7b"]
    gpus = 64 if stage else 1
    est = memory.estimate(cfg, zero=stage, gpus=gpus, mp_style="master")
    states = sum(est[k] for k in ("params_bytes", "grads_bytes", "master_bytes", "optimizer_bytes"))
    assert states == pytest.approx(memory.zero_model_state_bytes(psi, gpus, stage), rel=1e-6)
    # activations are not sharded by ZeRO
    assert est["activations_bytes"] == memory.estimate(cfg, mp_style="master")["activations_bytes"]


def test_zero_with_one_gpu_is_refused():
    cfg, _ = memory.load_model_config("llama-2-7b")
    with pytest.raises(UsageError, match="shards"):
        memory.estimate(cfg, zero=3, gpus=1)


def test_nf4_with_double_quantization_is_4_127_bits_per_weight():
    """QLoRA paper sec. 3: 4 + 8/64 + 32/(64*256) bits per weight."""
    n = 4096 * 11008
    packed, consts = memory.nf4_bytes(n)
    assert 8 * (packed + consts) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    cfg, _ = memory.load_model_config("llama-2-7b")
    # As the stages load it (measured on CPU through modeling.load_for_training, tests below): peft's
    # prepare_model_for_kbit_training leaves the unquantized norms, embeddings and head in fp32, and TRL's
    # SFTTrainer casts the adapters of a quantized model to bf16; PPO (our loop) keeps peft's fp32 adapters.
    est = memory.estimate(cfg, method="qlora", lora_r=64)
    linear = memory.PUBLISHED_PARAMS["llama-2-7b"] - 2 * 32000 * 4096 - 65 * 4096
    assert est["params_bytes"] == linear // 2 + (2 * 32000 * 4096 + 65 * 4096) * 4   # norms, embeddings, head in fp32
    adapters = 64 * 32 * (3 * (4096 + 4096) + (4096 + 4096) + 3 * (4096 + 11008))
    assert est["lora_params_bytes"] == 2 * adapters
    assert est["grads_bytes"] == est["lora_params_bytes"]
    assert est["optimizer_bytes"] == 2 * est["lora_params_bytes"]
    ppo = memory.estimate(cfg, stage="ppo", method="qlora", lora_r=64)
    assert ppo.roles[0]["role"] == "actor" and ppo["lora_params_bytes"] >= 4 * adapters


def test_8bit_adam_state():
    cfg, _ = memory.load_model_config("llama-2-7b")
    est = memory.estimate(cfg, optimizer="adamw8bit")
    psi = memory.PUBLISHED_PARAMS["llama-2-7b"]
    # 2 bytes + 2 absmax per 256 per parameter; the 65 norm vectors (4096 < min_8bit_size) keep fp32 states
    assert est["optimizer_bytes"] / psi == pytest.approx(2 + 8 / 256, rel=1e-3)
    assert memory.estimate(cfg, optimizer="sgd")["optimizer_bytes"] == 4 * psi


def test_korthikanti_attention_term_and_flash():
    """Korthikanti et al. 2022 eq. 1: s*b*h*(34 + 5*a*s/h) per layer in 16-bit with 1-byte dropout masks.

    With F.gelu(approximate="tanh"), pure bf16 and CUDA rules, a GPT-2 layer keeps exactly that (plus the
    layer norms' fp32 mean/rstd, 16*s*b bytes); SDPA/flash drops the 5*a*s^2*b attention term.
    """
    b, s, h, a = 2, 512, 1024, 16

    def per_layer(attn, layers=(4, 5)):
        cfg = dict(model_type="gpt2", n_embd=h, n_layer=layers[0], n_head=a, vocab_size=1000, n_positions=s,
                   activation_function="gelu_pytorch_tanh")
        e = [memory.estimate(dict(cfg, n_layer=n), batch_size=b, seq_len=s, precision="pure", attn=attn, device="cuda")
             for n in layers]
        return e[1]["activations_bytes"] - e[0]["activations_bytes"]

    assert per_layer("eager") == memory.korthikanti_layer_bytes(s, b, h, a) + 16 * s * b
    assert per_layer("sdpa") == memory.korthikanti_layer_bytes(s, b, h, a, flash=True) + 16 * s * b + 4 * b * a * s
    # HF's GPT-2 uses gelu_new (python ops): three more 4h-wide tensors per layer
    cfg = dict(model_type="gpt2", n_embd=h, n_layer=4, n_head=a, vocab_size=1000, n_positions=s)
    e4 = memory.estimate(cfg, batch_size=b, seq_len=s, precision="pure", attn="eager")
    e5 = memory.estimate(dict(cfg, n_layer=5), batch_size=b, seq_len=s, precision="pure", attn="eager")
    assert e5["activations_bytes"] - e4["activations_bytes"] == memory.korthikanti_layer_bytes(s, b, h, a) + 16 * s * b + 3 * 2 * 4 * h * s * b


def test_documented_llama_layer_formulas():
    """Every per-layer formula in docs/memory.md, against the estimator (GQA 4:1, CUDA rules unless noted)."""
    h, a, kvh, d, i, r, b, s = 1024, 16, 4, 64, 2816, 16, 2, 512
    q, k, t = a * d, kvh * d, b * s
    cfg = dict(model_type="llama", hidden_size=h, intermediate_size=i, num_hidden_layers=4, num_attention_heads=a,
               num_key_value_heads=kvh, vocab_size=5000, max_position_embeddings=4096)

    def per_layer(**kw):
        e = [memory.estimate(dict(cfg, num_hidden_layers=n), batch_size=b, seq_len=s, lora_r=r, **kw) for n in (4, 5)]
        return e[1]["activations_bytes"] - e[0]["activations_bytes"], e[1]["weight_copies_bytes"] - e[0]["weight_copies_bytes"]

    base = {"fp32": t * (24 * h + 8 * q + 8 * k + 16 * i + 8 + 4 * a),
            "mixed": t * (26 * h + 4 * q + 4 * k + 8 * i + 8 + 4 * a),
            "pure": t * (16 * h + 4 * q + 4 * k + 8 * i + 8 + 4 * a)}
    assert per_layer(dtype="fp32", device="cpu")[0] == base["fp32"]
    assert per_layer() == (base["mixed"], 2 * (2 * h * q + 2 * h * k + 3 * h * i))
    assert per_layer(precision="pure")[0] == base["pure"]
    assert per_layer(method="lora")[0] == t * (18 * h + 6 * q + 4 * k + 8 * i + 14 * r + 8 + 4 * a)
    # QLoRA as loaded (fp32 norms and embeddings: an fp32 residual; 4-bit layers return their input's dtype)
    assert per_layer(method="qlora")[0] == t * (18 * h + 4 * q + 4 * k + 14 * i + 14 * r + 8 + 4 * a)
    assert per_layer(attn="eager")[0] == base["mixed"] + t * (4 * q - 4 * k - 4 * a) + 6 * b * a * s * s
    assert per_layer(attn="eager", precision="pure")[0] == base["pure"] + t * (4 * q - 4 * k - 4 * a) + 6 * b * a * s * s
    assert per_layer(attn="eager", dtype="fp32")[0] == base["fp32"] + t * (8 * q - 8 * k - 4 * a) + 4 * b * a * s * s
    assert per_layer(grad_ckpt="full")[0] == 4 * t * h
    assert per_layer(grad_ckpt="full", precision="pure")[0] == 2 * t * h
    assert per_layer(grad_ckpt="full", method="lora")[0] == 2 * t * h


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    cfg, _ = memory.load_model_config("llama-2-7b")
    full = memory.estimate(cfg, batch_size=1, seq_len=4096, grad_ckpt="full", precision="pure")
    none = memory.estimate(cfg, batch_size=1, seq_len=4096, precision="pure")
    sbh = 4096 * 4096
    # each layer keeps its bf16 input; the final norm and the loss keep the rest
    assert full["activations_bytes"] == pytest.approx(32 * 2 * sbh + (4 + 2 + 2) * sbh, rel=0.01)
    # one layer is recomputed in backward: the per-layer share of the un-checkpointed run
    assert full["recompute_bytes"] == pytest.approx(none["activations_bytes"] / 32, rel=0.03)
    assert full.total_bytes < none.total_bytes


def test_logits_and_fp32_upcast_dominate_with_a_big_vocabulary():
    """Our own loops (pretrain, PPO's actor) keep the model's logits and the loss's fp32 log-softmax."""
    cfg, _ = memory.load_model_config("llama-3-8b")
    est = memory.estimate(cfg, stage="pretrain", batch_size=1, seq_len=8192, grad_ckpt="full")
    bsv = 8192 * 128256
    assert est["logits_bytes"] == bsv * (2 + 4)        # bf16 logits held + fp32 log-softmax saved
    assert est["loss_backward_bytes"] == 2 * 4 * bsv
    assert est["logits_bytes"] > est["activations_bytes"]


def test_eager_attention_adds_the_s_squared_term():
    cfg, _ = memory.load_model_config("llama-2-7b")
    sdpa = memory.estimate(cfg, batch_size=1, seq_len=4096)
    eager = memory.estimate(cfg, batch_size=1, seq_len=4096, attn="eager")
    # fp32 softmax + its bf16 copy, per layer, b*a*s^2 elements each
    assert eager.details["attention_s2_bytes"] >= 32 * 32 * 4096 ** 2 * (4 + 2)
    assert eager["activations_bytes"] - sdpa["activations_bytes"] > 32 * 32 * 4096 ** 2 * 6 * 0.95


def test_kv_cache_and_inference():
    cfg, _ = memory.load_model_config("llama-2-70b")
    est = memory.estimate(cfg, stage="inference", batch_size=8, seq_len=4096)
    assert est["kv_cache_bytes"] == 2 * 80 * 8 * 128 * 4096 * 8 * 2 == memory.kv_cache_bytes(cfg, 8, 4096)
    assert est["params_bytes"] == 2 * memory.PUBLISHED_PARAMS["llama-2-70b"]
    assert est["grads_bytes"] == 0 and est["optimizer_bytes"] == 0


def test_ppo_counts_four_models():
    cfg, _ = memory.load_model_config("llama-2-7b")
    full = memory.estimate(cfg, stage="ppo", batch_size=2, seq_len=1024)
    assert [r["role"] for r in full.roles] == ["actor", "critic", "reference", "reward"]
    assert [r["trains"] for r in full.roles] == [True, True, False, False]
    psi = memory.PUBLISHED_PARAMS["llama-2-7b"]
    ref = full.roles[2]["bytes"]
    assert ref == 2 * psi                                  # frozen reference in bf16
    lora = memory.estimate(cfg, stage="ppo", method="lora", batch_size=2, seq_len=1024)
    assert lora.roles[2]["bytes"] == 0                     # the actor with adapters disabled
    assert lora.total_bytes < full.total_bytes


def test_published_parameter_counts():
    published = {"llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9, "llama-3-8b": 8.03e9,
                 "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9, "gpt2": 124.4e6,
                 "gpt2-xl": 1.558e9}
    for name, n in published.items():
        cfg, _ = memory.load_model_config(name)
        assert memory.count_params(cfg) == pytest.approx(n, rel=0.003), name
        assert memory.count_params(cfg) == memory.PUBLISHED_PARAMS[name]


def test_project_presets_count_like_the_models_modeling_builds():
    """The project's build presets live in the torch-free presets module (modeling imports them from there);
    their counts match the models modeling.py builds."""
    project = presets.PRESETS
    pytest.importorskip("torch")
    from lifecycle import modeling

    assert modeling.PRESETS is presets.PRESETS
    for name in project:
        if presets.norm_name(name) in presets.ALIASES or name in presets.PUBLISHED:
            continue                      # a published architecture of the same name wins (full vocabulary)
        cfg, label = memory.load_model_config(name)
        assert name in label
        if "tiny" in name or "micro" in name:
            from transformers import AutoModelForCausalLM

            built = AutoModelForCausalLM.from_config(modeling.model_config(name, presets.PROJECT_VOCAB, 0, 1))
            assert memory.count_params(cfg) == sum(p.numel() for p in built.parameters()), name


def test_verdict_and_largest_micro_batch():
    cfg, _ = memory.load_model_config("llama-2-7b")
    est = memory.estimate(cfg, method="qlora", grad_ckpt="full", seq_len=2048, gpu_memory=24 * memory.GiB)
    assert est.fits and est.max_batch_size >= 1
    kw = dict(method="qlora", grad_ckpt="full", seq_len=2048)
    assert memory.estimate(cfg, batch_size=est.max_batch_size, **kw).total_bytes <= 24 * memory.GiB
    assert memory.estimate(cfg, batch_size=est.max_batch_size + 1, **kw).total_bytes > 24 * memory.GiB
    big = memory.estimate(cfg, gpu_memory=24 * memory.GiB)
    assert big.fits is False and big.max_batch_size == 0


def test_check_fits_refuses_warns_and_stays_quiet_on_cpu():
    cfg, _ = memory.load_model_config("llama-2-7b")
    with pytest.raises(UsageError, match="--force"):
        memory.check_fits(cfg, stage="sft", batch_size=1, seq_len=2048, device_bytes=16 * memory.GiB)
    lines = []
    est = memory.check_fits(cfg, stage="sft", batch_size=1, seq_len=2048, device_bytes=16 * memory.GiB, force=True,
                            echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning:") and est.fits is False
    tiny, _ = memory.load_model_config("gpt2")
    ok = memory.check_fits(tiny, seq_len=128, device_bytes=80 * memory.GiB, echo=lines.append)
    assert ok.fits and len(lines) == 1


def test_parse_size():
    assert memory.parse_size("80GiB") == 80 * 2 ** 30
    assert memory.parse_size("80GB") == 80 * 10 ** 9
    assert memory.parse_size("24 gib") == 24 * 2 ** 30
    for bad in ("lots", "80XB", "-5GiB", "0"):
        with pytest.raises(UsageError):
            memory.parse_size(bad)


def test_missing_config_fields_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UsageError, match="intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"):
        memory.shape_from_config(memory.load_model_config(str(tmp_path))[0])


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def _llm(*args):
    return subprocess.run([sys.executable, "-m", "lifecycle", "estimate-memory", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_table_json_and_no_torch(tmp_path):
    r = _llm("--model", "llama-2-7b", "--method", "lora", "--gpu-memory", "80GiB", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert isinstance(d[k], int)
    assert d["fits"] is True and d["max_batch_size"] >= 1
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text(json.dumps(presets.PUBLISHED["gpt2"]))
    r = _llm("--model", str(art), "--seq-len", "512")
    assert r.returncode == 0 and "total_bytes" in r.stdout and "params_bytes" in r.stdout
    code = "import sys, lifecycle.memory, lifecycle.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("args,expect", [
    (["--model", "llama-9000"], "known presets: "),
    (["--model", "CONFIG_MISSING_FIELDS"], "num_hidden_layers"),
    (["--model", "llama-2-7b", "--zero", "3"], "with one GPU it saves nothing"),
    (["--model", "llama-2-7b", "--batch-size", "-4"], "--batch-size -4"),
    (["--model", "llama-2-7b", "--seq-len", "0"], "--seq-len 0"),
    (["--model", "llama-2-7b", "--gpu-memory", "eighty"], "cannot read the memory size"),
    (["--model", "llama-2-7b", "--optimizer", "lion"], "--optimizer 'lion'"),
    (["--model", "gpt2", "--seq-len", "2048"], "n_positions=1024"),
    (["--model", "llama-2-7b", "--stage", "ppo", "--measure"], "estimate-only"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, args, expect):
    if "CONFIG_MISSING_FIELDS" in args:
        p = tmp_path / "config.json"
        p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128}))
        args = [str(p) if a == "CONFIG_MISSING_FIELDS" else a for a in args]
    r = _llm(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# ---------------------------------------------------------------------------
# what the stages run: sft's fused LM head, QLoRA as loaded, gradients between steps
# ---------------------------------------------------------------------------
def test_sft_runs_trls_fused_head_without_logits():
    """TRL 1.16's SFTTrainer scores tokens through a chunked head (add_fused_lm_head): no (tokens x vocab)
    logits. It keeps the N = b(s-1) hidden states (fp32 here: the residual under autocast), the label mask,
    target ids, log Z and entropy; backward needs an fp32 grad of the hidden states, one 4096 x 32768 bf16
    tile and bf16 chunks of the hidden states and the fp32 head weight. Pretrain keeps the full logits."""
    cfg, _ = memory.load_model_config("llama-3-8b")
    h, v, b, s = 4096, 128256, 2, 4096
    n, t = b * (s - 1), b * s
    kw = dict(batch_size=b, seq_len=s, grad_ckpt="full")
    sft, pre = memory.estimate(cfg, stage="sft", **kw), memory.estimate(cfg, stage="pretrain", **kw)
    assert sft["logits_bytes"] == 0
    assert sft["loss_backward_bytes"] == 4 * n * h + 4096 * 32768 * 2 + 4096 * h * 2 + 32768 * h * 2
    assert pre["logits_bytes"] == t * v * (2 + 4) and pre["loss_backward_bytes"] == 8 * t * v
    # the head's saved tensors replace the LM head's bf16 input copy, the shifted labels and nll's weight
    fused = n * h * 4 + n * (1 + 8 + 4 + 4) + 16
    assert sft["activations_bytes"] - pre["activations_bytes"] == fused - (t * h * 2 + 8 * t + 4)
    # the head's bf16 weight copy is no longer kept by autocast: TRL casts one vocabulary chunk at a time
    assert pre["weight_copies_bytes"] - sft["weight_copies_bytes"] == 2 * v * h
    lora = [memory.estimate(cfg, stage=st, method="lora", **kw).total_bytes for st in ("sft", "pretrain")]
    assert lora[0] < lora[1]


def test_qlora_states_as_the_loader_leaves_them():
    """peft's prepare_model_for_kbit_training: every unquantized weight fp32 (and so an fp32 residual);
    TRL's trainers cast a quantized model's adapters to bf16 (reward too), PPO keeps fp32."""
    cfg, _ = memory.load_model_config("qwen3-8b")
    h, v, L = 4096, 151936, 36
    est = memory.estimate(cfg, method="qlora", grad_ckpt="full", batch_size=4, seq_len=2048)
    unquantized = 2 * v * h + (2 * L + 1) * h + 2 * L * 128     # embeddings, head, norms, q/k norms
    linear = memory.count_params(cfg) - unquantized
    assert est["params_bytes"] == linear // 2 + 4 * unquantized
    assert est["activations_bytes"] >= L * 4 * 4 * 2048 * h          # fp32 layer inputs under checkpointing
    reward = memory.estimate(cfg, stage="reward", method="qlora", batch_size=1, seq_len=512)
    assert reward["lora_params_bytes"] == est["lora_params_bytes"]


def test_gradients_freed_between_steps_with_one_micro_batch():
    """zero_grad(set_to_none=True) after each step: with grad_accum=1 the forward holds no gradient and backward
    starts with the output head's; unknown (None) or accumulated micro-batches keep them all."""
    cfg, _ = memory.load_model_config("qwen3-0.6b")
    kw = dict(stage="sft", batch_size=4, seq_len=2048, device="cpu")
    keep, one, accum = (memory.estimate(cfg, grad_accum=g, **kw) for g in (None, 1, 4))
    assert keep.total_bytes == accum.total_bytes
    assert keep.total_bytes - one.total_bytes == keep["grads_bytes"] - 151936 * 1024 * 4   # tied head, fp32
    assert one.details["grads_at_peak_bytes"] == 151936 * 1024 * 4
    with pytest.raises(UsageError, match="grad_accum"):
        memory.estimate(cfg, grad_accum=0)


def test_presets_and_the_estimate_need_neither_modeling_nor_torch():
    """A project preset read and estimated in a fresh process leaves torch, transformers and modeling unimported."""
    code = ("import sys\nfrom lifecycle import memory, presets\n"
            "est = memory.estimate(presets.project_config(presets.PRESETS['llama-tiny']), device='cpu', batch_size=1, seq_len=8)\n"
            "assert est.total_bytes > 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'lifecycle.modeling') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-1000:]


def test_total_bytes_by_hand():
    """LLAMA above: N = 102,720 parameters (embeddings 320 x 64 = 20,480, per layer q 4,096 + k 2,048 + v 2,048 +
    o 4,096 + gate/up/down 3 x 6,144 + two norms 128 = 30,848, x 2 layers; final norm 64; untied head 20,480).
    fp32 AdamW on 2 processes with DDP, 4 micro-batches of 1 x 4 tokens (so gradients live throughout):
    weights 4N, gradients 4N, moments 8N (+ a 4-byte step count per tensor on the CPU: 21 tensors), DDP's
    buckets another 4N. A few tokens' activations are smaller than the optimizer step's temporaries (the largest
    tensor on the CPU, 4 x 20,480; every gradient's size on CUDA, foreach), so the peak is the optimizer step.
    On CUDA the context (512 MiB) and 5 % allocator margin come on top."""
    N = 320 * 64 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 6144 + 128) + 64 + 320 * 64
    assert N == memory.count_params(LLAMA) == 102_720
    kw = dict(stage="pretrain", method="full", dtype="fp32", batch_size=1, seq_len=4, gpus=2, grad_accum=4)
    cpu = memory.estimate(LLAMA, device="cpu", **kw)
    assert cpu.peak_phase == "optimizer step"
    assert cpu["ddp_buckets_bytes"] == 4 * N and cpu["optimizer_step_bytes"] == 4 * 20_480
    assert cpu.total_bytes == 4 * N + 4 * N + (8 * N + 4 * 21) + 4 * N + 4 * 20_480 == 2_136_404
    cuda = memory.estimate(LLAMA, device="cuda", **kw)
    before_overhead = 4 * N + 4 * N + 8 * N + 4 * N + 4 * N
    assert cuda["overhead_bytes"] == 512 * 2**20 + int(0.05 * before_overhead)
    assert cuda.total_bytes == before_overhead + 512 * 2**20 + int(0.05 * before_overhead) == 539_459_456


def test_qlora_compute_dtype_is_the_loaders():
    """The estimator's dtype table and the loader agree that 4-bit layers compute in bf16 (2 bytes)."""
    torch = pytest.importorskip("torch")
    from lifecycle.memory_arch import dtypes_for
    from lifecycle.modeling import quantization_config

    assert quantization_config().bnb_4bit_compute_dtype == torch.bfloat16
    for stage in ("sft", "reward", "ppo"):
        assert dtypes_for("mixed", "autocast", 2, "qlora", True, stage)["qcompute"] == 2
        assert dtypes_for("fp32", "autocast", 4, "qlora", True, stage)["qcompute"] == 2


def test_lora_under_bf16_loads_the_frozen_base_in_16_bits(tmp_path):
    """Issue 18's second bug: `llm sft --lora` under bf16 kept the frozen base in fp32, twice the estimate.
    The loader now stores it in bf16, adapters in fp32, and the estimate's params_bytes is what is loaded."""
    torch = pytest.importorskip("torch")
    from lifecycle.config import SFTConfig
    from lifecycle.modeling import CAUSAL_HEAD, build_model, load_for_training, model_config

    torch.manual_seed(0)
    conf = model_config("llama-micro", 300, 1, 2)
    build_model(conf).save_pretrained(tmp_path, safe_serialization=True)
    model = load_for_training(str(tmp_path), SFTConfig(lora=True, mixed_precision="bf16"), head=CAUSAL_HEAD)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    loaded = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    est = memory.estimate(conf.to_dict(), stage="sft", method="lora", lora_r=8, dtype="bf16", batch_size=1, seq_len=8,
                          device="cpu")
    assert est["params_bytes"] == loaded == 2 * memory.count_params(conf.to_dict())


def test_measure_builds_through_the_stage_loader(mm, monkeypatch):
    """--measure reads the model back through lifecycle.modeling.load_for_training (issue 18: the estimate and the
    measurement must not share a dtype table), and sft's step goes through TRL's fused head: no logits."""
    from lifecycle import modeling

    calls = []
    real = modeling.load_for_training
    monkeypatch.setattr(modeling, "load_for_training", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    meas = mm.measure(LLAMA, device="cpu", stage="sft", method="qlora", lora_r=4, batch_size=2, seq_len=24)
    assert len(calls) == 1 and calls[0].qlora and calls[0].mixed_precision == "bf16"
    assert meas["rows"]["logits_bytes"] == 0
    big = [s for s in meas["saved"] if s[1] and s[1][-1] == LLAMA["vocab_size"]]
    assert big == []


# ---------------------------------------------------------------------------
# dpo and grpo: their roles (lifecycle/stages/dpo.py, grpo.py)
# ---------------------------------------------------------------------------
def test_dpo_counts_a_frozen_reference_and_two_sequences_per_pair():
    """Llama-2-7B, bf16 mixed: the trained policy keeps fp32 weights (4 B/param), the frozen reference bf16
    (2 B/param); chosen and rejected share one forward, so a batch of 1 pair has pretraining's activations at 2."""
    cfg, _ = presets.load_model_config("llama-2-7b")
    n = 6_738_415_616
    d = memory.estimate(cfg, stage="dpo", batch_size=1, seq_len=512)
    p = memory.estimate(cfg, stage="pretrain", batch_size=2, seq_len=512)
    assert d.rows["params_bytes"] == 4 * n + 2 * n
    assert d.rows["activations_bytes"] == p.rows["activations_bytes"] and d.rows["grads_bytes"] == p.rows["grads_bytes"]
    assert [(r["role"], r["trains"], r["bytes"]) for r in d.roles][1] == ("reference", False, 2 * n)
    lora = memory.estimate(cfg, stage="dpo", method="lora", batch_size=1, seq_len=512)
    assert [(r["role"], r["bytes"]) for r in lora.roles][1] == ("reference", 0)  # the adapter disabled: no copy


def test_grpo_counts_reference_and_reward_model_and_the_sampling_cache():
    """The reward model is the backbone without the 32,000 x 4,096 output matrix plus a one-output head, in bf16."""
    cfg, _ = presets.load_model_config("llama-2-7b")
    n, head = 6_738_415_616, 32_000 * 4_096
    g = memory.estimate(cfg, stage="grpo", batch_size=2, seq_len=512)
    roles = {r["role"]: r["bytes"] for r in g.roles}
    assert roles["reference"] == 2 * n and roles["reward"] == 2 * (n - head + 4_096)
    assert g.rows["params_bytes"] == 4 * n + 2 * n + roles["reward"]
    assert g.details["rollout_kv_cache_bytes"] == memory.kv_cache_bytes(cfg, 2, 512, 2)
    out = subprocess.run([sys.executable, "-m", "lifecycle", "estimate-memory", "--model", "llama-2-7b", "--stage", "grpo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "reference" in out.stdout and "reward" in out.stdout, out.stderr
