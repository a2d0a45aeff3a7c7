"""GPT-2 124M pretraining throughput and MFU on a GPU, through `llm pretrain` itself.

The model is the `gpt2-124m` preset (12 layers, 768 wide, 12 heads, context 1024) with GPT-2's
vocabulary size, 50,257 tokens. No download: the tokenizer is a word-level one with 50,257 entries
built here, and the corpus is text drawn from it with Zipf-like word frequencies, so every block
holds 1024 real tokens. Each case runs the real stage (`lifecycle.stages.pretrain.run`) and reads
its log.jsonl: tokens/s and MFU as the progress line reports them (against the card's published
dense bf16 peak), the median over the logged windows after the first (which holds compilation).

    python bench/gpu_pretrain.py --out /tmp/gpu_pretrain [--cases compile-b16-v64,eager-b16-v64]
    python bench/gpu_pretrain.py --report /tmp/gpu_pretrain/gpu_pretrain.json   # docs/BENCHMARKS.md section
    python bench/gpu_pretrain.py --out /tmp/x --smoke                         # tiny shapes on the CPU (checks the script)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VOCAB = 50257  # GPT-2's
# name: (compile, micro-batch, vocab_multiple, steps)
CASES = {
    "compile-b16-v64": (True, 16, 64, 160),
    "compile-b16-v1": (True, 16, 1, 120),
    "eager-b16-v64": (False, 16, 64, 60),
    "compile-b32-v64": (True, 32, 64, 100),
    "compile-b32-v1": (True, 32, 1, 80),
    "compile-b64-v64": (True, 64, 64, 50),
}


def build_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` entries: <|endoftext|> and the words w1 ... w{vocab-1}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1_000_000)
    fast.save_pretrained(path)


def write_corpus(path: Path, vocab: int, tokens: int, doc_words: int = 4000) -> None:
    """JSONL documents of `doc_words` words each, drawn with Zipf-like frequencies (p ~ 1/rank)."""
    import numpy as np

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, vocab)
    p /= p.sum()
    ids = rng.choice(np.arange(1, vocab), size=tokens, p=p)
    with path.open("w") as f:
        for i in range(0, tokens, doc_words):
            f.write(json.dumps({"text": " ".join(f"w{j}" for j in ids[i : i + doc_words])}) + "\n")


def run_case(name: str, work: Path, smoke: bool) -> dict:
    from lifecycle.config import PretrainConfig, build_config
    from lifecycle.stages import pretrain

    compiled, batch, multiple, steps = CASES[name]
    seq, model = (1024, "gpt2-124m") if not smoke else (64, "gpt2-micro")
    if smoke:
        batch, steps = 2, 12
    out = work / f"out-{name}"
    cfg = build_config(PretrainConfig, None, dict(
        data=[str(work / "corpus.jsonl")], tokenizer=str(work / "tokenizer"), model=model, seq_len=seq,
        batch_size=batch, steps=steps, vocab_multiple=multiple, compile=compiled, out=str(out), overwrite=True,
        mixed_precision="bf16", lr=6e-4, min_lr=6e-5, warmup_steps=10, weight_decay=0.1,
        eval_every=steps, eval_batches=2, log_every=10 if not smoke else 4, save_every=0, keep_checkpoints=1,
        eval_fraction=0.01))
    t0 = time.perf_counter()
    pretrain.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_second" in r]
    steady = windows[1:] or windows
    m = json.loads((out / "lifecycle.json").read_text())["metrics"]
    first_window_s = windows[0]["step"] * batch * seq / windows[0]["tokens_per_second"] if windows else None
    return {
        "case": name, "model": model, "compile": compiled, "batch": batch, "seq": seq, "vocab_multiple": multiple,
        "steps": steps, "params": m.get("parameters"),
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady), "mfu_peak": steady[-1].get("mfu_peak"),
        "first_window_s": first_window_s, "first_window_steps": windows[0]["step"] if windows else None,
        "eval_loss_initial": m.get("eval_loss_initial"), "eval_loss": m.get("eval_loss"),
        "stage_wall_s": wall,
    }


def main() -> None:
    from _report import case_args, machine, run_cases

    args = case_args("gpu_pretrain", list(CASES), 300.0, "tiny model and corpus, any device")
    if args.report:
        return report(Path(args.report))
    work = args.out
    vocab = VOCAB if not args.smoke else 500
    t0 = time.perf_counter()
    build_tokenizer(work / "tokenizer", vocab)
    longest = max(CASES[c][1] * CASES[c][3] for c in args.cases.split(","))
    write_corpus(work / "corpus.jsonl", vocab, tokens=int(longest * (1024 if not args.smoke else 64) * 1.2) + 200_000)
    print(f"tokenizer and corpus in {time.perf_counter() - t0:.1f}s", flush=True)
    results = {"machine": machine(), "command": f"python bench/gpu_pretrain.py --cases {args.cases}", "cases": []}
    run_cases(args.cases.split(","), lambda name: run_case(name, work, args.smoke), results, args.json, args.budget_s)


def report(path: Path) -> None:
    from _report import unfinished_row, write_section

    res = json.loads(path.read_text())
    lines = [
        "## GPT-2 124M pretraining on a GPU: tokens/s and MFU",
        "",
        f"`{res['command']}` on {res['machine']}. `llm pretrain --model gpt2-124m` (GPT-2's 12 x 768 shape, "
        "context 1024, GPT-2's 50,257-token vocabulary, tied embeddings), bf16 autocast, fused AdamW, SDPA attention, "
        "seq 1024, on a synthetic word-level corpus built by the script (no download). Tokens/s and MFU are what the "
        "stage's progress line reports (MFU = tokens/s x 6N-plus-attention FLOPs per token over the card's published "
        "dense bf16 peak), medians over the logged 10-step windows after the first; the first window holds "
        "torch.compile's compilation.",
        "",
        "| case | compile | micro-batch x seq | vocabulary rows | tokens/s | MFU | first 10 steps (s) | held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        if (row := unfinished_row(c, 8)) is not None:
            lines.append(row)
            continue
        rows = -(-VOCAB // c["vocab_multiple"]) * c["vocab_multiple"]
        lines.append(f"| {c['case']} | {'yes' if c['compile'] else 'no'} | {c['batch']} x {c['seq']} | {rows:,} "
                     f"| {c['tokens_per_s']:,.0f} | {100 * c['mfu']:.1f}% of {c['mfu_peak']} | {c['first_window_s']:.1f} "
                     f"| {c['eval_loss_initial']:.2f} -> {c['eval_loss']:.2f} |")
    write_section("gpu_pretrain", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
