"""The estimator on today's decoder-only families: `llm estimate-memory` answers, and `--measure` agrees.

For a tiny random model of each family, one real training step on the CPU is
counted byte by byte (lifecycle.memory_measure) and set beside the estimate:
parameters, gradients and optimizer state must agree exactly, the tensors saved
for backward within 5 %. Families with a closed form (llama, mistral, qwen3) are
simulated op by op; the others are traced from the real module on fake tensors.

    python tests/test_memory_families.py      # prints the estimate-vs-measured table per family
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lifecycle import memory

# Families the shared fixture builds (tests/families.py), and more decoder-only architectures written here.
FIXTURE_FAMILIES = ("llama", "qwen3", "gemma2", "phi3", "mixtral", "qwen3_moe")
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
EXTRA = {
    "mistral": dict(_SMALL, model_type="mistral", sliding_window=16),
    "gemma3_text": dict(_SMALL, model_type="gemma3_text", head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "olmo2": dict(_SMALL, model_type="olmo2"),
    "granite": dict(_SMALL, model_type="granite", embedding_multiplier=12.0, logits_scaling=8.0),
    "starcoder2": dict(_SMALL, model_type="starcoder2", sliding_window=16),
    "cohere": dict(_SMALL, model_type="cohere", logit_scale=0.0625),
}
STATE_ROWS = ("params_bytes", "lora_params_bytes", "quant_constants_bytes", "grads_bytes", "optimizer_bytes")
SAVED_ROWS = ("weight_copies_bytes", "activations_bytes", "logits_bytes")
SETTINGS = dict(stage="sft", method="full", lora_r=4, dtype="bf16", optimizer="adamw", batch_size=2, seq_len=24,
                grad_ckpt="none", attn="sdpa")


@pytest.fixture(scope="module")
def mm():
    pytest.importorskip("peft")
    from lifecycle import memory_measure

    return memory_measure


def _config(family: str, family_dir) -> dict:
    if family in EXTRA:
        return dict(EXTRA[family])
    cfg, _ = memory.load_model_config(str(family_dir(family)))
    return cfg


def _compare(mm, config: dict, **kw) -> tuple[memory.Estimate, dict]:
    kw = dict(SETTINGS, **kw)
    est = memory.estimate(config, device="cpu", **kw)
    meas = mm.measure(config, device="cpu", **kw)
    for row in STATE_ROWS:
        assert est.rows.get(row, 0) == meas["rows"].get(row, 0), f"{row}: {est.rows.get(row, 0)} vs {meas['rows'].get(row, 0)}"
    assert est.n_trainable == meas["n_trainable"]
    for row in SAVED_ROWS + ("saved",):
        if row == "saved":
            e, m = (sum(d.get(r, 0) for r in SAVED_ROWS) for d in (est.rows, meas["rows"]))
        else:
            e, m = est.rows.get(row, 0), meas["rows"].get(row, 0)
        assert abs(e - m) <= 0.05 * max(m, 1), f"{row}: estimated {e} vs measured {m} ({kw})"
    return est, meas


@pytest.mark.parametrize("family", FIXTURE_FAMILIES + tuple(EXTRA))
def test_estimate_agrees_with_one_measured_step(mm, family_dir, family):
    config = _config(family, family_dir)
    _compare(mm, config)
    assert (memory.model_shape(config).arch != "generic") == (family in ("llama", "mistral", "qwen3"))


@pytest.mark.parametrize("family,kw", [
    ("qwen3", dict(method="lora")),                       # closed form with QK-norm, adapters on all seven projections
    ("qwen3", dict(method="qlora", grad_ckpt="full")),    # as the stage loads it: 4-bit, fp32 norms/embeddings, bf16 adapters
    ("llama", dict(method="qlora", batch_size=1)),        # b = 1: the fused head keeps the hidden states themselves
    ("mixtral", dict(method="lora")),                     # peft's all-linear also wraps the experts' 3-D weights
    ("gemma2", dict(method="lora", grad_ckpt="full")),    # no SDPA in transformers: eager attention, checkpointed
    ("phi3", dict(stage="reward")),                       # score head, chosen + rejected in one forward
    ("gemma3_text", dict(stage="reward", method="lora")),   # peft's trainable copy of the score head
    ("qwen3_moe", dict(dtype="fp32")),
])
def test_more_settings_agree(mm, family_dir, family, kw):
    _compare(mm, _config(family, family_dir), **kw)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_closed_form_matches_the_generic_trace(family_dir, family):
    """The op-by-op simulation and the traced real module count the same bytes (CPU rules)."""
    pytest.importorskip("torch")
    config = _config(family, family_dir)
    for kw in (dict(), dict(method="lora"), dict(grad_ckpt="full", batch_size=3)):
        kw = dict(SETTINGS, **kw)
        closed = memory.estimate(config, device="cpu", **kw)
        traced = memory.estimate(memory.generic_shape(config), device="cpu", **kw)
        assert closed.n_params == traced.n_params and closed.n_trainable == traced.n_trainable
        for row in STATE_ROWS:
            assert closed[row] == traced[row], row
        for row in SAVED_ROWS:
            assert closed[row] == pytest.approx(traced[row], rel=0.05, abs=64), (row, kw)


def test_generic_batches_beyond_two_extrapolate_linearly(family_dir):
    """Batch 1 and 2 are traced; batch 5 is their straight line, and a direct trace at 5 says the same
    (to a few bytes: small per-batch index tensors are not exactly affine)."""
    from lifecycle import memory_trace

    config = _config("gemma2", family_dir)
    st = memory_trace.Settings(head="lm", method="full", pdt=4, adt=4, half=2, autocast=True, attn="sdpa", ckpt=False,
                               lora_r=4, lora_dropout=0.0)
    line = memory_trace.trace(config, st, 5, 24)
    direct = memory_trace._trace_once(config, st, 5, 24)
    for k in ("copy", "act", "logits"):
        assert line[k] == pytest.approx(direct[k], rel=1e-3, abs=64), k


def test_cli_answers_for_every_family(family_dir, tmp_path):
    """`llm estimate-memory --model DIR` on each family's config.json: a table with a verdict."""
    for family in FIXTURE_FAMILIES + tuple(EXTRA):
        if family in EXTRA:
            target = tmp_path / family
            target.mkdir()
            (target / "config.json").write_text(json.dumps(EXTRA[family]))
        else:
            target = family_dir(family)
        lines: list[str] = []
        est = memory.cli_estimate(model=str(target), seq_len=64, gpu_memory="24GiB", echo=lines.append)
        assert est.total_bytes > est["params_bytes"] > 0 and est.fits and est.max_batch_size >= 1, family
        assert "verdict: fits in 24 GiB" in lines[0], family


def test_unbuildable_config_warns_in_stages_and_errors_in_the_command(tmp_path):
    cfg = {"model_type": "no_such_architecture", "hidden_size": 32}
    lines: list[str] = []
    assert memory.check_fits(cfg, stage="sft", device_bytes=80 * memory.GiB, echo=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: cannot estimate memory for model_type no_such_architecture")
    assert lines[0].endswith("; continuing")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "lifecycle", "estimate-memory", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot estimate memory for model_type no_such_architecture"), err


def test_a_confident_does_not_fit_still_refuses(family_dir):
    """Generic families are estimated, so a run that cannot fit is still refused (unless --force)."""
    from lifecycle.errors import UsageError

    cfg, _ = memory.load_model_config("mixtral-8x7b")
    with pytest.raises(UsageError, match="--force"):
        memory.check_fits(cfg, stage="sft", seq_len=512, device_bytes=24 * memory.GiB)


def _table() -> None:
    """Print the estimate-vs-measured table for every family (python tests/test_memory_families.py)."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from families import chatml_tokenizer, make_family_dir

    from lifecycle import memory_measure as mm

    torch.set_num_threads(1)
    tok = chatml_tokenizer()
    root = Path(tempfile.mkdtemp())
    print(f"settings: {SETTINGS}, device cpu")
    print("| family | path | row | estimated (B) | measured (B) | diff |")
    print("|---|---|---|---|---|---|")
    for family in FIXTURE_FAMILIES + tuple(EXTRA):
        if family in EXTRA:
            cfg = dict(EXTRA[family])
        else:
            cfg, _ = memory.load_model_config(str(make_family_dir(root / family, family, tok)))
        est = memory.estimate(cfg, device="cpu", **SETTINGS)
        meas = mm.measure(cfg, device="cpu", **SETTINGS)
        path = "closed form" if memory.model_shape(cfg).arch != "generic" else "traced"
        rows = [("params", "params_bytes"), ("grads", "grads_bytes"), ("optimizer", "optimizer_bytes")]
        for label, key in rows + [("activations (saved)", None)]:
            if key:
                e, m = est[key], meas["rows"][key]
            else:
                e = sum(est[r] for r in SAVED_ROWS)
                m = sum(meas["rows"].get(r, 0) for r in SAVED_ROWS)
            print(f"| {family} | {path} | {label} | {e:,} | {m:,} | {100 * (e - m) / m:+.2f}% |")


if __name__ == "__main__":
    _table()
