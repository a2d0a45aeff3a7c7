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
    from lifecycle.generate import generate_batch

    stock = pipeline("text-generation", model=model, tokenizer=tok)("12 plus 30 equals", max_new_tokens=4, do_sample=False,
                                                                    return_tensors=True)[0]["generated_token_ids"]
    prompt_ids = tok("12 plus 30 equals", add_special_tokens=False)["input_ids"]
    assert list(stock[: len(prompt_ids)]) == prompt_ids
    ours = generate_batch(model, tok, ["12 plus 30 equals"], max_new_tokens=4)[0]
    assert len(ours.token_ids) >= 1 and list(stock[len(prompt_ids):]) == ours.token_ids  # stock greedy == ours
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
    pretrain.run(_cfg(out, model="gpt2-micro", data=[str(data)], steps=4, eval_every=4, vocab_multiple=64))
    m = read_manifest(out)
    samples = [r["sample"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "sample" in r]
    assert samples and all(s.startswith("the cat number") for s in samples)  # a held-out document's start
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "gpt2"
    # vocab_multiple: the model's rows round the tokenizer's size up to whole tiles, and stock transformers
    # loads the artifact with its padded output layer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(out))
    assert conf["vocab_size"] % 64 == 0 and n_tok <= conf["vocab_size"] < n_tok + 64
    assert AutoModelForCausalLM.from_pretrained(out).get_output_embeddings().weight.shape[0] == conf["vocab_size"]
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


# ---------------------------------------------------------------------------
# What the loop does, seen from outside: clipping, the held-out split, resume in a new process
# ---------------------------------------------------------------------------
def test_clipping_bounds_every_update(tmp_path):
    """Every optimizer step sees gradients of global norm <= grad_clip, and the log's pre-clip norms exceed it
    (so clipping was exercised, not merely configured)."""
    from lifecycle.stages import pretrain

    seen: list[float] = []

    def before_step(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        out = tmp_path / "clip"
        pretrain.run(_cfg(out, steps=4, log_every=1, eval_every=4, grad_clip=0.05))
    finally:
        handle.remove()
    pre = [r["grad_norm"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "grad_norm" in r]
    assert len(seen) == len(pre) == 4
    assert min(pre) > 0.05  # every pre-clip norm above the threshold ...
    assert max(seen) <= 0.05 * (1 + 1e-4), seen  # ... and every update made from clipped gradients


def test_held_out_loss_is_the_loss_on_held_out_blocks(tmp_path, monkeypatch):
    """The manifest's eval_loss is the final model's mean loss over the first eval_batches x batch_size
    held-out blocks, recomputed here from the blocks pack() returned for the held-out documents."""
    from transformers import AutoModelForCausalLM

    from lifecycle.artifacts import read_manifest
    from lifecycle.stages import pretrain

    packed = []
    real_pack = pretrain.pack

    def spy(*a, **kw):
        packed.append(real_pack(*a, **kw)[0])
        return packed[-1], real_pack(*a, **kw)[1]

    monkeypatch.setattr(pretrain, "pack", spy)
    out = tmp_path / "heldout"
    pretrain.run(_cfg(out, steps=4, eval_every=4, eval_batches=2))
    train_blocks, eval_blocks = packed
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        losses = [model(input_ids=eval_blocks[i : i + 8], labels=eval_blocks[i : i + 8]).loss.item() for i in (0, 8)]
        on_train = model(input_ids=train_blocks[:16], labels=train_blocks[:16]).loss.item()
    eval_loss = read_manifest(out)["metrics"]["eval_loss"]
    assert eval_loss == pytest.approx(sum(losses) / 2, abs=1e-5)
    assert abs(eval_loss - on_train) > 1e-4  # the two sets differ enough to tell apart


def test_an_artifact_with_a_file_of_the_wrong_size_is_incomplete(tiny_base, tmp_path):
    import shutil

    from lifecycle.artifacts import check_artifact, is_complete
    from lifecycle.errors import UsageError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert is_complete(copy)
    with open(copy / "tokenizer.json", "ab") as f:  # one byte more than the manifest records
        f.write(b" ")
    assert not is_complete(copy)
    with pytest.raises(UsageError, match="incomplete"):
        check_artifact(str(copy), "causal-lm", "--base")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(tmp_path: Path, **kw) -> Path:
    """A recipe file for `llm pretrain` in a child process: GPT-2 shaped, with dropout 0.1 (so the RNG matters)."""
    model = tmp_path / "gpt2-dropout.json"
    model.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64,
                                 "n_positions": 64, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}))
    values = dict(model=str(model), seq_len=32, batch_size=8, steps=6, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                  eval_every=6, eval_batches=1, log_every=1, world_documents=300, vocab_size=300, save_every=3,
                  keep_checkpoints=3)
    values.update(kw)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return recipe


def _child(*args: str, code: str = "") -> subprocess.CompletedProcess:
    """`llm` in a fresh process (one thread, no warm caches), after `code` runs in it."""
    main = code + "\nimport sys\nsys.argv = ['llm', *sys.argv[1:]]\nfrom lifecycle.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", main, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _digests(ck: Path) -> dict:
    return {f.name: _sha(f) for f in sorted(ck.iterdir()) if f.suffix in (".safetensors", ".bin")}


def test_resume_in_a_new_process_is_exact_with_dropout(tmp_path):
    """A dropout model trained 6 steps in one process, and the same run resumed at step 3 in a second process,
    end with identical weights and optimizer state (digests of the final checkpoint): the checkpoint's RNG is
    restored, and nothing drawn between the restore and the loop (the MFU peak probe) moves the dropout masks."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path)
    r = _child("pretrain", "--config", str(recipe), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    final = checkpoints.checkpoint_root(out) / "step-000006"
    whole = _digests(final)
    assert {"model.safetensors", "optimizer.bin"} <= whole.keys()
    import shutil

    shutil.rmtree(final)
    r = _child("pretrain", "--config", str(recipe), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step-000003" in r.stdout
    assert _digests(final) == whole


def test_a_kill_inside_a_checkpoint_write_resumes_from_the_one_before(tmp_path):
    """The process dies half way through writing the step-4 checkpoint's optimizer state (the writer is patched
    to write half the bytes and exit). The half-written checkpoint must not count: --resume starts from step 2
    and ends where an uninterrupted run does."""
    from lifecycle.config import read_yaml
    from lifecycle.stages import pretrain

    recipe = _recipe(tmp_path, model="llama-micro", save_every=2)
    whole, part = tmp_path / "whole", tmp_path / "part"
    pretrain.run(build_config(PretrainConfig, None, {**read_yaml(recipe), "out": str(whole)}))  # the uninterrupted run
    kill = (
        "import io, os, torch\n"
        "real = torch.save\n"
        "calls = []\n"
        "def save(obj, f, *a, **k):\n"
        "    calls.append(str(f))\n"
        "    if 'step-000004' in str(f) and str(f).endswith('optimizer.bin'):\n"
        "        buf = io.BytesIO(); real(obj, buf, *a, **k)\n"
        "        open(f, 'wb').write(buf.getvalue()[: len(buf.getvalue()) // 2])\n"
        "        os._exit(9)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
    )
    r = _child("pretrain", "--config", str(recipe), "--out", str(part), code=kill)
    assert r.returncode == 9, (r.returncode, r.stderr[-2000:])
    assert checkpoints.latest_checkpoint(part).name == "step-000002"
    r = _child("pretrain", "--config", str(recipe), "--out", str(part), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step-000002" in r.stdout
    assert _sha(part / "model.safetensors") == _sha(whole / "model.safetensors")


# ---------------------------------------------------------------------------
# MFU: a published peak or a robust measured one, never above 100%
# ---------------------------------------------------------------------------
def test_a_slow_start_up_peak_cannot_make_mfu_exceed_100_percent():
    calls = []

    def fake_measure(fresh=False):  # a busy machine at start-up: 1 GFLOP/s; measured again later: 40 GFLOP/s
        calls.append(fresh)
        return 1e9 if not fresh else 40e9

    peak = training.PeakFlops(torch.device("cpu"), measure=fake_measure)
    assert peak.label() == "measured fp32 peak" and peak.value == 1e9
    assert peak.mfu(0.5e9) == pytest.approx(0.5)  # below the peak: no new measurement
    assert calls == [False]
    assert peak.mfu(10e9) == pytest.approx(0.25)  # beats the start-up peak: measured again, 10 / 40
    assert calls == [False, True] and peak.value == 40e9 and "raised by a faster step" in peak.describe()
    assert peak.mfu(60e9) == 1.0  # faster than any measurement: the peak becomes the achieved rate
    for achieved in (1e3, 1e9, 1e11, 1e13):
        assert 0 < peak.mfu(achieved) <= 1.0


def test_the_loop_never_logs_mfu_above_100_percent(tmp_path, monkeypatch):
    """The stage's own progress: a start-up probe that reads absurdly low (a busy machine) is raised by the first
    faster step, so every logged MFU lies in (0, 1] and names the peak it divides by."""
    import json

    from lifecycle.stages import pretrain

    monkeypatch.setattr(training, "measured_peak_flops", lambda device, dtype_name="float32", fresh=False: 1e3 if not fresh else 2e3)
    out = tmp_path / "mfu"
    pretrain.run(_cfg(out, steps=6, log_every=2, eval_every=6))
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in logged if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m <= 1.0 for m in mfus), mfus
    assert {r["mfu_peak"] for r in logged if "mfu" in r} == {"measured fp32 peak"}


def test_a_known_card_uses_its_published_dense_peak():
    never = lambda fresh=False: pytest.fail("a card with a published peak is not measured")  # noqa: E731
    h100 = training.PeakFlops(torch.device("cpu"), "bfloat16", card="NVIDIA H100 80GB HBM3", measure=never)
    assert (h100.value, h100.label()) == (989e12, "H100 bf16 peak")
    assert h100.mfu(494.5e12) == pytest.approx(0.5)
    a100 = training.PeakFlops(torch.device("cpu"), "float32", card="NVIDIA A100-SXM4-40GB", measure=never)
    assert (a100.value, a100.label()) == (19.5e12, "A100 fp32 peak")  # not the A10's row, although "A10" is in the name
    assert training.published_peak_flops("NVIDIA A10", "bfloat16") == ("A10", 125e12)
    assert training.published_peak_flops("Some Future GPU", "bfloat16") is None


def test_the_peak_probe_leaves_the_global_rng_alone():
    """The probe runs after a resumed checkpoint restored the RNG; drawing from it would move dropout masks."""
    state = torch.get_rng_state()
    training.measured_peak_flops(torch.device("cpu"), fresh=True)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------
# Speed changes that must not change the numbers
# ---------------------------------------------------------------------------
def test_the_multi_tensor_optimizer_is_bit_equal_to_the_per_parameter_loop(tmp_path, monkeypatch):
    """AdamW's foreach path (the loop's default on the CPU) does the per-parameter loop's arithmetic: the same
    weights bit for bit after a few steps, so the speed-up leaves the default recipe's numbers alone."""
    from lifecycle.stages import pretrain

    built = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, params, **kw):
            built.append(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    pretrain.run(_cfg(tmp_path / "a", steps=6, eval_every=6))
    assert built[-1].get("foreach") is True

    class Loop(real):
        def __init__(self, params, **kw):
            super().__init__(params, **{**kw, "foreach": False, "fused": False})

    monkeypatch.setattr(torch.optim, "AdamW", Loop)
    pretrain.run(_cfg(tmp_path / "b", steps=6, eval_every=6))
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")


def test_the_gpt2_presets_pretrain_without_dropout_and_with_the_one_kernel_gelu():
    import torch
    from transformers.activations import ACT2FN

    from lifecycle.modeling import build_model, model_config
    from lifecycle.presets import PRESETS, project_config

    for name in ("gpt2-tiny", "gpt2-micro", "gpt2-124m"):
        c = model_config(name, 300, 0, 1)
        assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0), name
        # the memory estimate builds the same model from the preset
        assert project_config(PRESETS[name])["activation_function"] == c.activation_function == "gelu", name
    # "gelu" is torch's exact GELU, one kernel (what nanoGPT's nn.GELU computes); GPT2Config's default "gelu_new"
    # is the tanh approximation written out as separate ops, 0.0002 away at most
    act = build_model(model_config("gpt2-micro", 300, 0, 1)).transformer.h[0].mlp.act
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(act(x), torch.nn.functional.gelu(x))
    assert 0 < (act(x) - ACT2FN["gelu_new"](x)).abs().max() < 5e-4
