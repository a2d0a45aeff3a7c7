"""Throughput of `llm data` per step on this machine, cold and with a warm cache; writes its section of
docs/BENCHMARKS.md.

    python bench/data.py [--docs 20000] [--num-proc 1 2]

The corpus is synthetic (built here, offline): pseudo-English documents of 100-160 words in two sources,
with 10% exact copies, 10% near copies (3 words changed), 5% documents that break a Gopher rule, 5% with an
e-mail address or phone number, decontaminated against the built-in world's held-out problems.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import machine, write_section  # noqa: E402
from lifecycle.config import DataConfig, build_config  # noqa: E402
from lifecycle.stages import data  # noqa: E402


def corpus(d: Path, n: int) -> list[str]:
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    stops = ("the", "of", "and", "to", "with", "that")

    def doc() -> str:
        return " ".join(rng.choice(stops) if rng.random() < 0.25 else rng.choice(vocab) for _ in range(rng.randint(100, 160))) + "."

    docs = [doc() for _ in range(int(n * 0.7))]
    docs += [rng.choice(docs) for _ in range(int(n * 0.1))]                       # exact copies
    for _ in range(int(n * 0.1)):                                                  # near copies
        w = rng.choice(docs).split()
        for k in rng.sample(range(len(w)), 3):
            w[k] = rng.choice(vocab)
        docs.append(" ".join(w))
    docs += [" ".join(doc().split()[:30]) for _ in range(int(n * 0.05))]          # too short (Gopher)
    docs += [doc() + f" mail user{i}@example.com or 555-010-{i % 10000:04d}" for i in range(int(n * 0.05))]
    rng.shuffle(docs)
    d.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for name, part in (("a", docs[:half]), ("b", docs[half:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return [f"a={d / 'a.jsonl'}:1", f"b={d / 'b.jsonl'}:1"]


def run(sources: list[str], out: Path, num_proc: int) -> tuple[float, dict]:
    cfg = build_config(DataConfig, None, {"out": str(out), "source": sources, "num_proc": num_proc, "shard_size": 2500})
    t0 = time.perf_counter()
    data.run(cfg)
    return time.perf_counter() - t0, json.loads((out / "data.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        sources = corpus(tmp / "in", args.docs)
        rows, totals = [], []
        for p in args.num_proc:
            out = tmp / f"out-{p}"
            cold, m = run(sources, out, p)
            warm, m2 = run(sources, out, p)
            assert all(s["cached"] for s in m2["steps"] if s["enabled"])
            totals.append(f"| {p} | {cold:.1f} | {warm:.2f} | {warm / cold:.1%} | {m['documents']} |")
            for s in m["steps"]:
                rows.append(f"| {p} | {s['step']} | {s['docs_in']} | {s['docs_out']} | {s['seconds']:.2f} | {s['docs_per_s']:.0f} |")
        text = "\n".join([
            "## `llm data`: documents per second per step",
            "",
            f"Measured with `python bench/data.py --docs {args.docs} --num-proc {' '.join(map(str, args.num_proc))}` on "
            f"{machine(with_torch=False)}. Synthetic corpus of {args.docs} documents of 100-160 words in two sources "
            "(10% exact copies, 10% near copies, 5% too short, 5% with PII); shards of 2,500 documents; default settings "
            "(MinHash 128 permutations, 5-gram shingles, threshold 0.6; Gopher rules; 13-gram decontamination against the "
            "built-in world's held-out problems). Step times include starting the worker processes where a step is the first to use them.",
            "",
            "| workers | step | docs in | docs out | seconds | docs/s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Whole run, cold cache vs the rerun with a warm cache (every step found in OUT/.cache; what remains is reading "
            "the manifest of each step, linking the shards, the report and its plots):",
            "",
            "| workers | cold (s) | warm (s) | warm / cold | documents out |",
            "|---|---|---|---|---|",
            *totals,
        ])
        print(text)
        write_section("data", text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
