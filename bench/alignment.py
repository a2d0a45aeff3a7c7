"""PPO, GRPO and DPO head to head on the built-in world, from one SFT model; the table goes into docs/alignment.md.

    python bench/alignment.py --sft runs/default/sft --reward runs/default/reward --out /tmp/align
    python bench/alignment.py ... --methods grpo-gold,dpo --seeds 0      # a subset
    python bench/alignment.py ... --over-optimise                        # also each method pushed too far
    python bench/alignment.py ... --only-finished                        # tabulate the runs in --out so far

Each (method, seed) runs its stage as a user would, in its own process, with its
default recipe and --seed: `llm ppo` (reward model), `llm grpo --reward RM`
(reward model), `llm grpo --reward-fn gold` (the gold checker as a verifiable
reward) and `llm dpo` (pairs from the SFT model's samples judged by the gold
checker). A finished run is kept and reused (delete OUT/<method>-<seed> to redo it).
Every final model is then evaluated the same way: greedy answers to the 500
held-out problems, judged by the gold checker and scored by the reward model; the
KL to the SFT model is each stage's own measure (exact per-token KL summed along
responses sampled at temperature 1). Wall time is the stage process's, on this
machine as it was (a shared machine inflates it).

--over-optimise runs each method once more with the brakes off (a weak or zero KL
penalty, a higher learning rate, longer), to show what over-optimisation does to
each: the reward model's score against the gold checker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {  # name -> (label, command after `llm`, recipe)
    "ppo": ("PPO (reward model)", ["ppo", "--policy", "{sft}", "--reward", "{rm}"], "ppo.yaml"),
    "grpo-rm": ("GRPO (reward model)", ["grpo", "--policy", "{sft}", "--reward", "{rm}"], "grpo.yaml"),
    "grpo-gold": ("GRPO (gold checker)", ["grpo", "--policy", "{sft}", "--reward-fn", "gold"], "grpo.yaml"),
    "dpo": ("DPO (gold-judged pairs)", ["dpo", "--base", "{sft}"], "dpo.yaml"),
    "grpo-rm-slow": ("GRPO (reward model), kl_coef 0.2, lr 5e-5", ["grpo", "--policy", "{sft}", "--reward", "{rm}",
                     "--set", "kl_coef=0.2", "--set", "lr=5e-5"], "grpo.yaml"),
}
# Over-optimisation: each method with its brakes off.
OVER = {
    "ppo": ["--config", "recipes/default/ppo-hacking.yaml"],
    "grpo-rm": ["--set", "kl_coef=0", "--set", "lr=2e-4", "--set", "steps=120"],
    "grpo-gold": ["--set", "lr=5e-4"],
    "dpo": ["--set", "sft_weight=0"],  # plain DPO: the preference loss alone
    "grpo-rm-slow": [],
}


def run_stage(method: str, seed: int, args, over: bool) -> Path:
    out = Path(args.out) / f"{method}{'-over' if over else ''}-{seed}"
    if (out / "lifecycle.json").is_file():
        return out
    _, cmd, recipe = METHODS[method]
    cmd = [c.format(sft=args.sft, rm=args.reward) for c in cmd]
    full = [sys.executable, "-m", "lifecycle", *cmd, "--out", str(out), "--seed", str(seed)]
    full += OVER[method] if over and method == "ppo" else ["--config", f"recipes/default/{recipe}"]
    if over and method != "ppo":
        full += OVER[method]
    print("$ " + " ".join(full[2:]), flush=True)
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(Path(args.out) / f"{out.name}.log", "w") as log:
        p = subprocess.run(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {p.returncode}); see {args.out}/{out.name}.log")
    (out / "bench_wall_seconds").write_text(f"{time.perf_counter() - t:.1f}\n")
    return out


def evaluate(path: Path, rm, rm_tok, problems) -> dict:
    """Greedy answers to the held-out problems: gold accuracy and mean reward-model score."""
    from lifecycle.data import world
    from lifecycle.generate import generate_batch, render_prompts
    from lifecycle.modeling import load_causal_lm
    from lifecycle.reward_model import score
    from lifecycle.tokenizer import load_tokenizer

    tok, model = load_tokenizer(str(path)), load_causal_lm(str(path)).eval()
    chats = [[world.user(p.question)] for p in problems]
    samples = generate_batch(model, tok, render_prompts(tok, chats), max_new_tokens=6)
    gold = [world.gold_check(p.question, s.text, s.ended) for p, s in zip(problems, samples)]
    rm_scores = score(rm, rm_tok, chats, [s.text for s in samples])
    return {"gold": sum(gold) / len(gold), "rm": sum(rm_scores) / len(rm_scores)}


def mean_sd(xs: list[float], digits: int = 1) -> str:
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def table(rows: dict, before: dict, seeds: list[int], over: bool) -> str:
    lines = ["| method | gold accuracy (SFT " + f"{100 * before['gold']:.1f}%) | gain per seed (points) | RM score (SFT "
             f"{before['rm']:.2f}) | KL to SFT (nats) | wall time |", "|---|---|---|---|---|---|"]
    for method, runs in rows.items():
        if not runs:
            continue
        gains = [100 * (r["gold"] - before["gold"]) for r in runs]
        lines.append(
            f"| {METHODS[method][0]}{' over-optimised' if over else ''} | {mean_sd([100 * r['gold'] for r in runs])}% | "
            f"{', '.join(f'{g:+.1f}' for g in gains)} | {mean_sd([r['rm'] for r in runs], 2)} | "
            f"{statistics.mean(r['kl'] for r in runs):.2f} | {statistics.mean(r['wall'] for r in runs):.0f} s |")
    return "\n".join(lines)


def write_table(text: str, path: Path = ROOT / "docs/alignment.md") -> None:
    from lifecycle.artifacts import atomic_write_text

    start, end = "<!-- alignment-table:start -->", "<!-- alignment-table:end -->"
    doc = path.read_text(encoding="utf-8")
    assert start in doc and end in doc, f"{path} has no {start} ... {end} markers"
    head, rest = doc.split(start, 1)
    atomic_write_text(path, head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", default="runs/default/sft")
    ap.add_argument("--reward", default="runs/default/reward")
    ap.add_argument("--out", default="/tmp/alignment-bench")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--over-optimise", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="stage runs at once (each takes one thread)")
    ap.add_argument("--only-finished", action="store_true", help="run nothing: tabulate the runs already in --out")
    ap.add_argument("--no-write", action="store_true", help="print the table; leave docs/alignment.md as it is")
    args = ap.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import torch

    from lifecycle.data import world
    from lifecycle.reward_model import load_reward_model
    from lifecycle.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    passes = [False, True] if args.over_optimise else [False]
    todo = {over: [(m, s) for m in methods for s in (seeds if not over else seeds[:1])] for over in passes}
    if args.only_finished:
        done = lambda m, s, over: (Path(args.out) / f"{m}{'-over' if over else ''}-{s}" / "lifecycle.json").is_file()  # noqa: E731
        todo = {over: [(m, s) for m, s in todo[over] if done(m, s, over)] for over in passes}
    jobs = [(m, s, over) for over in passes for m, s in todo[over]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process
        outs = dict(zip(jobs, pool.map(lambda j: run_stage(j[0], j[1], args, j[2]), jobs)))
    rm, rm_tok = load_reward_model(args.reward), load_tokenizer(args.reward)
    problems = world.heldout_problems()
    before = evaluate(Path(args.sft), rm, rm_tok, problems)
    print(f"SFT model: gold {100 * before['gold']:.1f}%, RM score {before['rm']:.2f}", flush=True)
    sections = []
    for over in passes:
        rows: dict = {m: [] for m in methods}
        for method, seed in todo[over]:
            out = outs[(method, seed, over)]
            m = json.loads((out / "lifecycle.json").read_text())["metrics"]
            r = evaluate(out, rm, rm_tok, problems)
            wall = out / "bench_wall_seconds"  # the stage process's wall time; else the stage's own count
            r.update(kl=m["kl"], wall=float(wall.read_text()) if wall.is_file() else m["wall_seconds"])
            rows[method].append(r)
            print(f"{out.name}: gold {100 * r['gold']:.1f}% ({100 * (r['gold'] - before['gold']):+.1f}), RM score "
                  f"{r['rm']:.2f}, KL {r['kl']:.2f}, {r['wall']:.0f} s", flush=True)
        sections.append(table(rows, before, seeds, over))
    cmd = "python bench/alignment.py " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    from _report import machine

    text = "\n\n".join(sections) + f"\n\n`{cmd}` on a {machine()}."
    print(text)
    if not args.no_write:
        write_table(text)


if __name__ == "__main__":
    main()
