"""`llm pretrain`: schedule, clipping, packing, data order, a tiny end-to-end run, exact resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifecycle import checkpoints, training
from lifecycle.config import PretrainConfig, build_config
from lifecycle.errors import Interrupted
from lifecycle.stages.pretrain import pack
from lifecycle.training import batch_indices


# ---------------------------------------------------------------------------
# Schedule, parameter groups, clipping
# ---------------------------------------------------------------------------
def test_lr_schedule_matches_closed_form():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110)
    # Warmup: linear, lr * (step + 1) / warmup.
    assert training.lr_at(0, **kw) == pytest.approx(0.1)
    assert training.lr_at(4, **kw) == pytest.approx(0.5)
    assert training.lr_at(9, **kw) == pytest.approx(1.0)
    # Cosine: start of decay is the peak, the midpoint is (lr + min_lr) / 2, the end is min_lr.
    assert training.lr_at(10, **kw) == pytest.approx(1.0)
    assert training.lr_at(60, **kw) == pytest.approx(0.55)
    assert training.lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert training.lr_at(110, **kw) == pytest.approx(0.1)
    assert training.lr_at(500, **kw) == pytest.approx(0.1)  # capped after the end
    assert training.lr_at(3, lr=2.0, min_lr=0.0, warmup=0, total=3) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    from lifecycle.modeling import build_model, model_config

    model = build_model(model_config("gpt2-micro", 300, 0, 1))
    decay, no_decay = training.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # Every trainable parameter is in exactly one group; the tied embedding appears once.
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_clip_grad_norm_by_global_norm():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])
    norm = acc.clip_grad_norm_([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)  # the pre-clip global norm, sqrt(3² + 4²)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5) and b.grad.tolist() == pytest.approx([0.8], rel=1e-5)
    # Below the threshold nothing changes.
    a.grad = torch.tensor([0.3, 0.0])
    b.grad = torch.tensor([0.4])
    acc.clip_grad_norm_([a, b], 1.0)
    assert a.grad.tolist() == pytest.approx([0.3, 0.0]) and b.grad.tolist() == pytest.approx([0.4])


# ---------------------------------------------------------------------------
# Packing and data order
# ---------------------------------------------------------------------------
def test_packing_loses_and_duplicates_no_token():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    blocks, dropped = pack(docs, eos_id=0, seq_len=4)
    stream = [1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 0, 10, 11, 0]
    assert blocks.shape == (3, 4)
    assert blocks.flatten().tolist() == stream[:12]  # in order, nothing lost or repeated
    assert dropped == 3 == len(stream) - 12
    assert pack([[1]], 0, 4)[0].shape == (0, 4)


def test_batch_order_covers_every_block_once_per_epoch():
    n, G = 10, 4
    seen = [i for step in range(5) for i in batch_indices(step, G, n, seed=3)]  # 20 items = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(2, G, n, seed=3) == batch_indices(2, G, n, seed=3)
    assert batch_indices(0, G, n, seed=3) != batch_indices(0, G, n, seed=4)
    assert sorted(i for step in range(5) for i in batch_indices(step, G, n, seed=3, rng="python")) == sorted(2 * list(range(10)))


def test_batch_order_is_pinned_for_each_stage():
    """The data order each stage was tuned with (pretrain: torch, ppo: python) never moves: golden values
    from the two functions this one replaced, across an epoch boundary."""
    assert batch_indices(3, 4, 10, seed=7) == [9, 2, 3, 6]
    assert batch_indices(0, 5, 7, seed=0) == [4, 0, 5, 3, 2]
    assert batch_indices(3, 4, 10, seed=7, rng="python") == [0, 1, 7, 6]
    assert batch_indices(0, 5, 7, seed=0, rng="python") == [4, 2, 1, 0, 5]
    with pytest.raises(ValueError):
        batch_indices(0, 1, 2, seed=0, rng="numpy")


# ---------------------------------------------------------------------------
# End to end on tiny models
# ---------------------------------------------------------------------------
def _cfg(out, **kw):
    base = dict(out=str(out), model="llama-micro", seq_len=32, batch_size=8, steps=8, warmup_steps=2, lr=3e-3,
                min_lr=3e-4, eval_every=4, eval_batches=2, log_every=2, world_documents=300, vocab_size=300, save_every=0)
    base.update(kw)
    return build_config(PretrainConfig, None, base)


def test_tiny_pretrain_writes_a_standard_artifact(tmp_path):
    from lifecycle.artifacts import is_complete, read_manifest
    from lifecycle.stages import pretrain

    out = tmp_path / "base"
    pretrain.run(_cfg(out, steps=12, lr=1e-2, eval_every=6))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "lifecycle.json", "log.jsonl"):
        assert (out / f).is_file(), f
    assert is_complete(out)
    m = read_manifest(out)
    assert m["stage"] == "pretrain" and m["kind"] == "causal-lm" and m["parent"] is None
    metrics = m["metrics"]
    for k in ("eval_loss_initial", "eval_loss", "tokens_seen", "tokens_per_second"):
        assert k in metrics
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] - 1.0
    assert metrics["tokens_seen"] == 12 * 8 * 32
    assert m["config"]["model"] == "llama-micro"
    # Stock transformers loads it and the pipeline generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    text = pipeline("text-generation", model=model, tokenizer=tok)("12 plus 30 equals", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("12 plus 30 equals")
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    _assert_tokenizer_readable_by_transformers_4(out)


def _assert_tokenizer_readable_by_transformers_4(path: Path) -> None:
    """transformers 4.x reads tokenizer_config.json's tokenizer_class through its own table (it has no
    TokenizersBackend), calls .keys() on extra_special_tokens (a list fails), and older 4.x releases
    read the chat template from tokenizer_config.json only."""
    conf = json.loads((path / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(conf.get("extra_special_tokens"), list)
    assert conf["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert conf["eos_token"] == "<|endoftext|>" and conf["pad_token"] == "<|pad|>"
    assert "<|assistant|>" in conf["chat_template"]
    tok = json.loads((path / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and {t["content"] for t in tok["added_tokens"]} >= {"<|endoftext|>", "<|pad|>"}


def test_portable_tokenizer_files_load_the_same_in_transformers_5(tmp_path, tiny_tokenizer, chatml_tokenizer):
    from transformers import AutoTokenizer

    from lifecycle.tokenizer import save_tokenizer

    msgs = [{"role": "user", "content": "what is 12 plus 30 ?"}, {"role": "assistant", "content": "42"}]
    for name, tok in (("ours", tiny_tokenizer), ("chatml", chatml_tokenizer)):
        plain, portable = tmp_path / f"{name}-plain", tmp_path / f"{name}-portable"
        tok.save_pretrained(plain)
        save_tokenizer(tok, portable)
        assert json.loads((plain / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
        a, b = AutoTokenizer.from_pretrained(plain), AutoTokenizer.from_pretrained(portable)
        for attr in ("eos_token", "pad_token", "bos_token", "all_special_tokens", "extra_special_tokens", "chat_template"):
            assert getattr(a, attr) == getattr(b, attr), attr
        text = "add 12 and 30 to get 42 .<|endoftext|>"
        assert a(text)["input_ids"] == b(text)["input_ids"]
        assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    _assert_tokenizer_readable_by_transformers_4(tmp_path / "ours-portable")
    conf = json.loads((tmp_path / "chatml-portable" / "tokenizer_config.json").read_text())
    assert conf["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"] and "<|im_end|>" in conf["chat_template"]


def test_sample_prompt_on_user_text_is_the_start_of_a_held_out_document(tiny_tokenizer):
    from lifecycle.stages.pretrain import sample_prompt

    held = ["the cat number 7 sat on mat 3 . it was a quiet day in the town", "other"]
    user = build_config(PretrainConfig, None, {"out": "x", "data": ["corpus.txt"]})
    prompt = sample_prompt(user, held, tiny_tokenizer)
    ids = tiny_tokenizer(held[0], add_special_tokens=False)["input_ids"]
    assert prompt == tiny_tokenizer.decode(ids[:8]) and held[0].startswith(prompt) and 0 < len(prompt) < len(held[0])
    # The built-in world keeps its prompt; a prompt the user gives is used as given.
    assert sample_prompt(build_config(PretrainConfig, None, {"out": "x"}), held, tiny_tokenizer) == "the sum of 48 and 87 is"
    mine = build_config(PretrainConfig, None, {"out": "x", "data": ["c.txt"], "sample_prompt": "once upon"})
    assert sample_prompt(mine, held, tiny_tokenizer) == "once upon"
    # A held-out document of two tokens gives its first.
    assert sample_prompt(user, ["ab 1"], tiny_tokenizer) == tiny_tokenizer.decode(tiny_tokenizer("ab 1")["input_ids"][:1])


def test_gpt2_preset_and_user_text_file(tmp_path):
    from lifecycle.artifacts import read_manifest
    from lifecycle.stages import pretrain

    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"the cat number {i} sat on mat {i % 7} ." for i in range(200)))
    out = tmp_path / "gpt2"
    pretrain.run(_cfg(out, model="gpt2-micro", data=[str(data)], steps=4, eval_every=4))
    m = read_manifest(out)
    samples = [r["sample"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "sample" in r]
    assert samples and all(s.startswith("the cat number") for s in samples)  # a held-out document's start
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert "heldout_completion_accuracy" not in m["metrics"]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_exact_resume_after_ctrl_c(tmp_path, monkeypatch):
    """N steps, Ctrl-C, resume to 2N == 2N uninterrupted (fp32 on CPU, max abs diff <= 1e-6)."""
    from lifecycle.stages import pretrain

    N = 5
    full = tmp_path / "full"
    pretrain.run(_cfg(full, steps=2 * N))

    # Send a real SIGINT while step N-1 is being prepared; the loop saves a checkpoint after step N.
    real_lr_at = training.lr_at

    def lr_at_with_signal(step, **kw):
        if step == N - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(training, "lr_at", lr_at_with_signal)
    with pytest.raises(Interrupted, match=f"at step {N}"):
        pretrain.run(_cfg(part, steps=2 * N))
    monkeypatch.setattr(training, "lr_at", real_lr_at)
    assert checkpoints.latest_checkpoint(part).name == f"step-{N:06d}"
    assert not (part / "lifecycle.json").exists()  # no artifact from an interrupted run

    pretrain.run(_cfg(part, steps=2 * N, resume=True))
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    # The log after resuming matches the uninterrupted one step for step.
    la = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r.get("loss") for r in la] == pytest.approx([r.get("loss") for r in lb], abs=1e-6)


def test_keeps_last_k_checkpoints(tmp_path):
    from lifecycle.stages import pretrain

    out = tmp_path / "ck"
    pretrain.run(_cfg(out, steps=8, save_every=2, keep_checkpoints=2))
    names = [p.name for p in checkpoints.list_checkpoints(out)]
    assert names == ["step-000006", "step-000008"]


# ---------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing on disk changed
# ---------------------------------------------------------------------------
def llm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_usage_error(r, *needles):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("one tiny doc\n\nand another")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lr: 1e-3\nlearning_rate: 0.1\n")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert_usage_error(llm("pretrain", "--out", str(out), "--data", str(tmp_path / "missing.txt")), "not found")
    assert_usage_error(llm("pretrain", "--out", str(out), "--data", str(empty)), "empty")
    assert_usage_error(llm("pretrain", "--out", str(out), "--config", str(recipe)), "learning_rate", "valid options")
    assert_usage_error(llm("pretrain", "--out", str(out), "--resume"), "no checkpoint")
    assert_usage_error(llm("pretrain", "--out", str(afile)), "is a file")
    assert_usage_error(llm("pretrain", "--out", str(out), "--set", "lr=fast"), "lr")
    assert_usage_error(llm("pretrain", "--out", str(out), "--data", str(short), "--set", "seq_len=64", "--set", "vocab_size=300"),
                       "fewer tokens than one block")
    assert afile.read_text() == "keep me"
    assert not out.exists() or not (out / "lifecycle.json").exists()


def test_help_does_not_import_torch():
    code = "import sys, lifecycle.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    r = llm("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and "estimate-memory" in r.stdout
