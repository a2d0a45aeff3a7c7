"""The bad-input suite: every stage, fed malformed input, exits 2 with one `error:` line and changes nothing on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def snapshot(root: Path) -> dict:
    """Every directory and file under root, following symbolic links (`base` links to the shared tiny base, which
    a stage must not touch either): directories by name, files by content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = Path(dirpath).relative_to(root)
        out[f"{rel}/"] = "directory"
        for f in filenames:
            out[str(rel / f)] = hashlib.sha256((Path(dirpath) / f).read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    """A directory of inputs, good and bad, shared by every case."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("bad")
    w = lambda name, text: (d / name).write_text(text, encoding="utf-8")  # noqa: E731
    w("empty.txt", "")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n\nmore text here".encode("latin-1"))
    w("truncated.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": "thr')
    w("wrongtype.jsonl", '{"text": 5}\n{"text": 6}\n')
    w("nocolumn.jsonl", '{"body": "a"}\n{"body": "b"}\n')
    w("blank.jsonl", '{"text": ""}\n{"text": "   "}\n')
    w("doc.docx", "not really a docx")
    w("short.txt", "one tiny doc\n\nand another")
    w("unknown_key.yaml", "lr: 1e-3\nlearning_rate: 0.1\n")
    w("wrong_type.yaml", "steps: many\n")
    w("list.yaml", "- a\n- b\n")
    w("afile", "keep me")
    w("sft_nocols.jsonl", '{"question": "hi", "answer": "there"}\n')
    w("sft_badmessages.jsonl", '{"messages": "hello"}\n')
    w("pairs_nopref.jsonl", '{"prompt": "hi", "completion": "there"}\n')
    w("pairs_same.jsonl", '{"prompt": "what is 1 plus 2 ?", "chosen": "3", "rejected": "3"}\n' * 3)
    w("prompts_empty.jsonl", "")
    w("run_badstage.yaml", "stages:\n  pretrain: {}\n  distill: {}\n")
    (d / "empty_dir").mkdir()
    (d / "noweights").mkdir()
    w("noweights/config.json", json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (d / "notlm").mkdir()
    w("notlm/config.json", json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    w("notlm/model.safetensors", "")
    # A base whose weights were cut short.
    broken = d / "broken"
    broken.mkdir()
    for f in Path(tiny_base).iterdir():
        if f.is_file() and f.name != "lifecycle.json":
            (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    # A reward model (one-label classifier) over the tiny base.
    tok = load_tokenizer(str(tiny_base))
    cfg = AutoConfig.from_pretrained(tiny_base, num_labels=1)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    save_model_artifact(rm, tok, d / "rm", stage="reward", config={}, metrics={"eval_accuracy": 0.9}, parent=None, seed=0)
    (d / "base").symlink_to(tiny_base)
    return d


# (name, argv with {d} for the inputs directory, a word the message must contain)
CASES = [
    # pretrain
    ("pretrain-missing-data", "pretrain --out {d}/o --data {d}/nope.txt", "not found"),
    ("pretrain-empty-file", "pretrain --out {d}/o --data {d}/empty.txt", "empty"),
    ("pretrain-non-utf8", "pretrain --out {d}/o --data {d}/latin1.txt", "UTF-8"),
    ("pretrain-truncated-jsonl", "pretrain --out {d}/o --data {d}/truncated.jsonl", "line 3"),
    ("pretrain-wrong-type", "pretrain --out {d}/o --data {d}/wrongtype.jsonl", "expected a string"),
    ("pretrain-missing-column", "pretrain --out {d}/o --data {d}/nocolumn.jsonl", "text_column"),
    ("pretrain-empty-strings", "pretrain --out {d}/o --data {d}/blank.jsonl", "no non-empty"),
    ("pretrain-unsupported-type", "pretrain --out {d}/o --data {d}/doc.docx", "unsupported"),
    ("pretrain-unknown-recipe-key", "pretrain --out {d}/o --config {d}/unknown_key.yaml", "valid options"),
    ("pretrain-wrong-type-recipe", "pretrain --out {d}/o --config {d}/wrong_type.yaml", "integer"),
    ("pretrain-recipe-not-mapping", "pretrain --out {d}/o --config {d}/list.yaml", "mapping"),
    ("pretrain-missing-recipe", "pretrain --out {d}/o --config {d}/nope.yaml", "not found"),
    ("pretrain-resume-nothing", "pretrain --out {d}/o --resume", "no checkpoint"),
    ("pretrain-out-is-file", "pretrain --out {d}/afile", "is a file"),
    ("pretrain-corpus-too-short", "pretrain --out {d}/o --data {d}/short.txt --set seq_len=64", "fewer tokens"),
    ("pretrain-seq-beyond-context", "pretrain --out {d}/o --model llama-micro --set seq_len=4096", "context"),
    ("pretrain-unknown-model", "pretrain --out {d}/o --model llama-9000", "presets"),
    ("pretrain-negative-lr", "pretrain --out {d}/o --set lr=-1", "lr"),
    # sft
    ("sft-missing-base", "sft --base {d}/nope --out {d}/o", "does not exist"),
    ("sft-given-reward-model", "sft --base {d}/rm --out {d}/o", "reward"),
    ("sft-base-without-weights", "sft --base {d}/noweights --out {d}/o", "weights"),
    ("sft-base-not-causal-lm", "sft --base {d}/notlm --out {d}/o", "causal"),
    ("sft-corrupted-safetensors", "sft --base {d}/broken --out {d}/o", "truncated"),
    ("sft-missing-columns", "sft --base {d}/base --out {d}/o --data {d}/sft_nocols.jsonl", "column"),
    ("sft-empty-file", "sft --base {d}/base --out {d}/o --data {d}/empty.txt", "empty"),
    ("sft-bad-messages", "sft --base {d}/base --out {d}/o --data {d}/sft_badmessages.jsonl", "messages"),
    ("sft-unknown-option", "sft --base {d}/base --out {d}/o --set lora_rank=8", "valid options"),
    # reward
    ("reward-no-preference-columns", "reward --base {d}/base --out {d}/o --data {d}/pairs_nopref.jsonl", "chosen"),
    ("reward-identical-pairs", "reward --base {d}/base --out {d}/o --data {d}/pairs_same.jsonl", "identical"),
    ("reward-base-not-causal-lm", "reward --base {d}/notlm --out {d}/o", "causal"),
    # ppo
    ("ppo-policy-and-reward-swapped", "ppo --policy {d}/rm --reward {d}/base --out {d}/o", "reward"),
    ("ppo-reward-not-classifier", "ppo --policy {d}/base --reward {d}/base --out {d}/o", "reward"),
    ("ppo-empty-prompt-file", "ppo --policy {d}/base --reward {d}/rm --out {d}/o --prompts {d}/prompts_empty.jsonl", "empty"),
    # generate
    ("generate-missing-model", "generate --model {d}/nope hello", "does not exist"),
    ("generate-negative-temperature", "generate --model {d}/base --temperature -1 hello", "temperature"),
    # estimate-memory
    ("memory-unknown-preset", "estimate-memory --model llama-9000", "llama-2-7b"),
    ("memory-negative-batch", "estimate-memory --model llama-2-7b --batch-size -4", "batch"),
    ("memory-zero3-one-gpu", "estimate-memory --model llama-2-7b --zero 3 --gpus 1", "GPU"),
    ("memory-bad-gpu-memory", "estimate-memory --model llama-2-7b --gpu-memory lots", "gpu-memory"),
    # run
    ("run-unknown-stage", "run {d}/run_badstage.yaml --out {d}/r", "distill"),
    ("run-from-empty-manifest", "run --from-manifest {d}/empty_dir --out {d}/r", "lifecycle.json"),
    # data, eval, sweep
    ("data-missing-source", "data --out {d}/o --source {d}/nope.jsonl", "not found"),
    ("eval-missing-model", "eval --model {d}/nope --out {d}/o", "does not exist"),
    ("eval-given-reward-model", "eval --model {d}/rm --out {d}/o", "reward"),
    ("sweep-missing-space", "sweep pretrain --space {d}/nope.yaml --out {d}/o", "not found"),
]
COMMANDS = [c.name or c.callback.__name__ for c in __import__("lifecycle.cli").cli.app.registered_commands]
if "dpo" in COMMANDS:
    CASES.append(("dpo-missing-base", "dpo --base {d}/nope --out {d}/o", "does not exist"))
if "grpo" in COMMANDS:
    CASES.append(("grpo-missing-policy", "grpo --policy {d}/nope --reward-fn gold --out {d}/o", "does not exist"))


def _main_in_process(args: list[str], capsys) -> tuple[int, str]:
    """`llm ARGS` through the CLI's own entry point in this process (exit code, stderr): the same code path as the
    command line without paying a Python and torch start-up per case. An exception that escapes `main` would be
    a traceback on the command line; here it fails the test with that traceback."""
    from lifecycle import cli

    old = sys.argv
    sys.argv = ["llm", *args]
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, name, argv, needle, capsys):
    before = snapshot(world)
    args = [a.format(d=world) for a in argv.split()]
    code, stderr = _main_in_process(args, capsys)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stderr[-1500:])
    assert "Traceback" not in stderr, stderr[-1500:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr[-1500:]
    assert needle.lower() in errors[0].lower(), errors[0]
    after = snapshot(world)
    assert after == before, ("a failed run changed the disk: new " + str(sorted(after.keys() - before.keys())) +
                             ", changed " + str(sorted(k for k in before if k in after and before[k] != after[k])))


@pytest.mark.parametrize("name", ["pretrain-unknown-model", "sft-missing-base", "memory-negative-batch"])
def test_bad_input_from_the_command_line(world, name):
    """A few cases as a user meets them: a fresh `python -m lifecycle` process, its exit status and stderr."""
    argv, needle = next((a, n) for c, a, n in CASES if c == name)
    r = subprocess.run([sys.executable, "-m", "lifecycle", *[a.format(d=world) for a in argv.split()]],
                       capture_output=True, text=True, timeout=180)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-1500:]
    assert needle.lower() in errors[0].lower(), errors[0]


def test_every_command_has_a_bad_input_case():
    """Each command of the CLI (read from the Typer app, not from this list) is fed bad input at least once."""
    assert set(COMMANDS) <= {c[1].split()[0] for c in CASES}, set(COMMANDS) - {c[1].split()[0] for c in CASES}


def test_snapshot_sees_through_links_and_sees_new_directories(tmp_path):
    target, root = tmp_path / "target", tmp_path / "root"
    target.mkdir()
    root.mkdir()
    (target / "config.json").write_text('{"a": 1}')
    (root / "base").symlink_to(target)
    before = snapshot(root)
    (target / "config.json").write_text('{"a": 2}')  # same size, through the link
    assert snapshot(root) != before
    (target / "config.json").write_text('{"a": 1}')
    assert snapshot(root) == before
    (root / "o").mkdir()  # an empty new directory
    assert snapshot(root) != before
