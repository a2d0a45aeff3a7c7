"""PPO throughput and memory: rollout and update time and peak memory per iteration, on the default recipe.

    python bench/ppo.py                       # 12 iterations: 1 and 2 threads, then rollout_micro_batch_size 32
    python bench/ppo.py --iterations 6 --threads 1 --rollout-chunks 0 --no-write
    python bench/ppo.py --policy DIR --reward DIR
    python bench/ppo.py --profile             # where the update's time goes (torch profiler, iterations 2-3)
    python bench/ppo.py --trl-python /tmp/trl029/bin/python   # and TRL 0.29's PPOTrainer beside it (bench/trl_ppo.py)

Runs the real loop (lifecycle/stages/ppo.py) on runs/default/sft and
runs/default/reward when they exist, else on freshly initialised models of the
same size (llama-tiny with the built-in world's tokenizer), and reads the
per-iteration timings the loop logs to OUT/log.jsonl: generation time (batched
sampling with a KV cache), the whole rollout (generation + actor, reference,
critic and reward-model passes, GAE) and the update (4 epochs x 2 minibatches of
actor and critic forward/backward + AdamW). The first iteration is warm-up and is
left out; the medians of the rest are reported, with the loop's per-iteration peak
memory of the rollout and of the update (resident memory on the CPU, allocated
memory on a GPU). Each setting runs in its own process (torch fixes its thread
pool at start-up, and a process's memory high-water mark is its own).

The update's arithmetic: the loop's minibatch shapes are recorded, and the actor's and the
critic's training FLOPs over those tokens (the project's MFU count, without the output
projection over the vocabulary) are set against the update's time, beside the rate of this core's matrix product (fp32 sgemm, best
of 20) at the shape of the update's largest matrix product. With --trl-python, TRL 0.29's
PPOTrainer runs on the same models and shapes (bench/trl_ppo.py) after the first setting,
with its thread count, and the table gets its seconds per PPO step and our ratio to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import machine, write_section  # noqa: E402

# What the speed work of issue 13 found (kept with the section: a rerun measures only the code as it is now).
NOTES = """\
Where the update goes (`python bench/ppo.py --profile`: torch profiler over the updates of iterations 2-3,
untrained llama-tiny actor and critic, one thread): matrix products of the actor's and the critic's forward and
backward passes take about two thirds of its CPU time, the attention kernel about 8%, the element-wise products
of RMSNorm, rotary embeddings and SwiGLU about 9-12%, AdamW 2.5-3%; the PPO arithmetic itself (log-softmax over the
~300-token vocabulary at the 5 response positions, ratios, clipping, value loss) is too small to show among the
top operators. The loop already
computes logits at the response positions only (`logits_to_keep`) and takes one backward for both losses.
What is left is the two models' own passes over prompt + response, which a shared actor-critic backbone or
fewer epochs would cut, but both change what the default recipe computes; not done.
Changed: the update's AdamW runs on its multi-tensor (foreach) path, bit-equal to the per-parameter loop
(the same logged losses and actor weights over 3 iterations); its share of the update's CPU time went from
3.05% to 2.54% (two `--profile` runs), a half-percent gain.
Against TRL: the issue measured 0.70x of TRL 0.29's time on its machine; here, on the same models, one thread,
it is 0.88x (2.12 s against 2.42 s per PPO step, the figures above; 0.92x, 2.16 against 2.36 s, in an earlier run). TRL's trainer makes the same model passes
(policy and value model over prompt + response in every minibatch, the four no-grad passes of the rollout), so
the half of TRL's time that the issue asks for would need half the arithmetic; the update already runs at
about half of this core's sgemm rate (45 of 80 GFLOP/s), with the matrix products themselves at about 59
(`--profile`: 64% of the update's time), the rest attention and element-wise kernels that only compilation
would fuse, and the update's shapes change every iteration. Not reached; what would reach it changes the
recipe (fewer epochs, a shared actor-critic trunk) or the arithmetic (bf16 on a CPU with AVX-512 BF16 or AMX).
"""


def random_models(root: Path) -> tuple[str, str]:
    """A llama-tiny policy and reward model with the world's tokenizer, untrained (same shapes as the default run)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.data import world
    from lifecycle.modeling import build_model, model_config
    from lifecycle.tokenizer import train_tokenizer

    tok = train_tokenizer(world.pretrain_documents(2000, seed=1), vocab_size=512)
    torch.manual_seed(0)
    cfg = model_config("llama-tiny", len(tok), tok.eos_token_id, tok.pad_token_id)
    save_model_artifact(build_model(cfg), tok, root / "policy", stage="sft", config={}, metrics={}, parent=None, seed=0)
    cfg.num_labels = 1
    save_model_artifact(AutoModelForSequenceClassification.from_config(cfg), tok, root / "reward", stage="reward",
                        config={}, metrics={}, parent=None, seed=0)
    return str(root / "policy"), str(root / "reward")


def measure(args) -> dict:
    """One run of the loop in this process; the per-iteration medians."""
    import torch

    from lifecycle.artifacts import is_complete
    from lifecycle.config import PPOConfig, build_config
    from lifecycle.stages import ppo

    torch.set_num_threads(args.one_run)
    shapes: list[tuple[int, int]] = []  # (sequences, padded length) of every minibatch step
    step = ppo.minibatch_step

    def recorded(roles, mb, *a, **k):
        shapes.append(tuple(mb.model_inputs()[0].shape))
        return step(roles, mb, *a, **k)

    ppo.minibatch_step = recorded
    with tempfile.TemporaryDirectory() as tmp:
        if is_complete(args.policy) and is_complete(args.reward):
            policy, reward = args.policy, args.reward
            rel = Path(args.policy).resolve()
            models = f"`{rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel}` and its reward model"
        else:
            policy, reward = random_models(Path(tmp))
            models = "untrained llama-tiny policy and reward model (runs/default/sft not found)"
        out = Path(tmp) / "ppo"
        cfg = build_config(PPOConfig, str(ROOT / "recipes/default/ppo.yaml"), {
            "policy": policy, "reward": reward, "out": str(out), "max_steps": args.iterations,
            "eval_every": 10_000, "eval_prompts": 50, "save_every": 0, "log_every": 10_000,
            "rollout_micro_batch_size": args.rollout_micro_batch_size})
        t0 = time.perf_counter()
        try:
            ppo.run(cfg)
        finally:
            ppo.minibatch_step = step
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
        arith = update_arithmetic(policy, shapes, args.iterations)
    its = [r for r in rows if "rollout_seconds" in r][1:]  # drop the warm-up iteration
    med = lambda k: statistics.median(r[k] for r in its)  # noqa: E731
    mem = {k: med(k) if all(k in r for r in its) else float("nan") for k in ("rollout_peak_mib", "update_peak_mib")}
    return {"threads": args.one_run, "chunk": args.rollout_micro_batch_size, **mem, "models": models, "wall": wall,
            "gen_tps": med("rollout_tokens_per_second"),
            "gen_s": med("generate_seconds"), "roll_s": med("rollout_seconds"), "upd_s": med("update_seconds"),
            "tokens": statistics.median(r["response_length"] for r in its) * cfg.prompts_per_rollout, **arith}


def update_arithmetic(policy: str, shapes: list, iterations: int) -> dict:
    """GFLOP of one iteration's update, and this core's sgemm rate at the update's largest matrix product.

    Each minibatch of b sequences padded to t tokens costs the actor and the critic (the policy's shape, as
    with `critic: reward` on the default run) b x t x the project's training FLOPs per token
    (`training.flops_per_token`, which the MFU figures use) less its output projection over the vocabulary:
    the update computes the actor's logits at the response positions only, and the critic's head has one output.
    """
    import torch
    from transformers import AutoConfig

    from lifecycle.training import flops_per_token

    conf = AutoConfig.from_pretrained(policy)
    d = conf.hidden_size
    per_token = lambda t: flops_per_token(conf, t) - 6 * d * conf.vocab_size  # noqa: E731
    flops = sum(2 * b * t * per_token(t) for b, t in shapes) / iterations  # every iteration updates alike
    m = max(b * t for b, t in shapes)
    f = getattr(conf, "intermediate_size", None) or 4 * d
    x, w = torch.randn(m, d), torch.randn(d, f)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t0)
    return {"update_gflop": flops / 1e9, "update_tokens": sum(b * t for b, t in shapes) / iterations,
            "sgemm_gflops": 2 * m * d * f / best / 1e9, "sgemm_shape": f"{m}x{d} @ {d}x{f}"}


def profile_update(args) -> None:
    """The torch profiler's operator table over the update phase of iterations 2 and 3 (one thread), and the
    share of the update spent in matrix products, attention, the optimizer and the rest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lifecycle.config import PPOConfig, build_config
    from lifecycle.stages import ppo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward = random_models(Path(tmp))
        cfg = build_config(PPOConfig, str(ROOT / "recipes/default/ppo.yaml"), {
            "policy": policy, "reward": reward, "out": str(Path(tmp) / "ppo"), "max_steps": 3, "eval_every": 10_000,
            "eval_prompts": 50, "save_every": 0, "log_every": 10_000})
        update, calls, prof = ppo.ppo_update, [0], profile(activities=[ProfilerActivity.CPU])

        def profiled(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                prof.__enter__()
            try:
                return update(*a, **k)
            finally:
                if calls[0] == 3:
                    prof.__exit__(None, None, None)

        ppo.ppo_update = profiled
        try:
            ppo.run(cfg)
        finally:
            ppo.ppo_update = update
    rows = prof.key_averages()
    print(rows.table(sort_by="self_cpu_time_total", row_limit=25))
    total = sum(e.self_cpu_time_total for e in rows)
    groups = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
              "attention kernel": ("aten::_scaled_dot_product",),
              "elementwise mul/add (norms, rotary, SwiGLU, losses)": ("aten::mul", "aten::add")}
    for name, prefixes in groups.items():
        t = sum(e.self_cpu_time_total for e in rows if e.key.startswith(prefixes))
        print(f"{name}: {100 * t / total:.1f}% of the update's CPU time")
    t = sum(e.cpu_time_total for e in rows if e.key.startswith("Optimizer.step"))  # AdamW with everything it calls
    print(f"AdamW steps: {100 * t / total:.1f}% of the update's CPU time")


def trl_baseline(args, threads: int) -> dict:
    """bench/trl_ppo.py under --trl-python on the same models: TRL's seconds per PPO step."""
    import subprocess

    cmd = [args.trl_python, str(ROOT / "bench/trl_ppo.py"), "--sft", args.policy, "--reward", args.reward,
           "--n", str(args.iterations), "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"the TRL baseline failed:\n{p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, one run each")
    ap.add_argument("--policy", default=str(ROOT / "runs/default/sft"))
    ap.add_argument("--reward", default=str(ROOT / "runs/default/reward"))
    ap.add_argument("--rollout-chunks", default="32", help="comma-separated rollout_micro_batch_size values, each "
                    "measured with the first thread count (0 = the whole rollout batch; already measured)")
    ap.add_argument("--rollout-micro-batch-size", type=int, default=0, help=argparse.SUPPRESS)  # internal
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile the update phase instead of timing")
    ap.add_argument("--one-run", type=int, default=0, help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    ap.add_argument("--trl-python", metavar="PYTHON", help="a Python with trl 0.29 installed: also time TRL's "
                    "PPOTrainer on the same models (bench/trl_ppo.py)")
    args = ap.parse_args()
    if args.trl_python and not shutil.which(args.trl_python):
        ap.error(f"--trl-python {args.trl_python}: not an executable Python; make one with trl 0.29 (bench/trl_ppo.py)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one_run:
        print("RESULT " + json.dumps(measure(args)))
        return
    if args.profile:
        profile_update(args)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = []
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    chunks = [int(c) for c in args.rollout_chunks.split(",") if c.strip() and int(c) > 0]
    for n, chunk in [(n, 0) for n in threads] + [(threads[0], c) for c in chunks]:
        cmd = [sys.executable, __file__, "--one-run", str(n), "--iterations", str(args.iterations),
               "--policy", args.policy, "--reward", args.reward, "--rollout-micro-batch-size", str(chunk)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(n)})
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"benchmark run with {n} thread(s), rollout chunks of {chunk or 'all'} failed:\n{p.stderr[-2000:]}")
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"{n} thread(s), rollout chunks of {chunk or 'all'}: generation {r['gen_s']:.2f} s ({r['gen_tps']:,.0f} "
              f"tokens/s), rollout {r['roll_s']:.2f} s, update {r['upd_s']:.2f} s, {r['roll_s'] + r['upd_s']:.2f} s per "
              f"iteration; peak memory rollout {r['rollout_peak_mib']:,.0f} MiB, update {r['update_peak_mib']:,.0f} MiB; "
              f"update {r['update_gflop']:.0f} GFLOP at {r['update_gflop'] / r['upd_s']:.0f} GFLOP/s (sgemm "
              f"{r['sgemm_shape']}: {r['sgemm_gflops']:.0f} GFLOP/s)")
        if args.trl_python and len(results) == 1:
            trl = trl_baseline(args, n)
            r["trl_s"], r["trl"] = trl["median_s"], trl["trl"]
            print(f"TRL {trl['trl']} PPOTrainer, {n} thread(s): {trl['median_s']:.2f} s per PPO step; ours / TRL "
                  f"{(r['roll_s'] + r['upd_s']) / trl['median_s']:.2f}")
    lines = [
        "## PPO: rollout and update time and peak memory per iteration",
        "",
        f"Machine: {machine()}. Command: `python bench/ppo.py --iterations {args.iterations} --threads {args.threads} "
        f"--rollout-chunks {args.rollout_chunks}" + (" --trl-python TRL_0.29_PYTHON" if args.trl_python else "") + "`.",
        f"Models: {results[0]['models']}; recipe `recipes/default/ppo.yaml` (128 prompts, up to 5 new tokens, "
        "4 epochs x 2 minibatches of 64). Medians over iterations 2-" + f"{args.iterations}.",
        f"The machine's 1-minute load average at the start was {load:.1f}"
        + (" (other jobs shared the cores, so these times are inflated)" if load > 1.0 else "") + ".",
        "",
        "Peak memory is the process's resident memory during each phase of an iteration (the loop resets the "
        "high-water mark at the start of the iteration and after the rollout), so it includes the four models, "
        "Python and torch themselves.",
        "",
        "| torch threads | rollout_micro_batch_size | generation (batched sampling, KV cache) | whole rollout (generation + "
        "actor, reference, critic and reward passes, GAE) | update (8 minibatch steps of actor and critic forward/backward "
        f"+ AdamW) | iteration | peak memory: rollout / update | whole run of {args.iterations} iterations "
        "(loading, held-out evals, stalls included) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['threads']} | {r['chunk'] or 'all (128)'} | {r['gen_s']:.2f} s, {r['gen_tps']:,.0f} generated "
                     f"tokens/s ({r['tokens']:.0f} tokens) | {r['roll_s']:.2f} s | {r['upd_s']:.2f} s | "
                     f"{r['roll_s'] + r['upd_s']:.2f} s | {r['rollout_peak_mib']:,.0f} / {r['update_peak_mib']:,.0f} MiB | "
                     f"{r['wall']:.0f} s |")
    r = results[0]
    lines += ["", f"The update's arithmetic ({r['threads']} thread(s)): actor and critic over {r['update_tokens']:,.0f} tokens "
              "per iteration (8 minibatches of prompt + response, padded), at `training.flops_per_token` (6 x matrix "
              "parameters + attention) less the output projection over the vocabulary = "
              f"{r['update_gflop']:.0f} GFLOP per iteration in {r['upd_s']:.2f} s: {r['update_gflop'] / r['upd_s']:.0f} GFLOP/s, "
              f"against {r['sgemm_gflops']:.0f} GFLOP/s for this core's fp32 matrix product at the update's largest shape "
              f"({r['sgemm_shape']}, best of 20)."]
    if "trl_s" in r:
        lines += ["", f"TRL {r['trl']}'s PPOTrainer on the same models and shapes (`bench/trl_ppo.py`, run by "
                  f"`--trl-python`, {r['threads']} thread(s), median of PPO steps 3-{args.iterations}): {r['trl_s']:.2f} s per "
                  f"PPO step; ours {r['roll_s'] + r['upd_s']:.2f} s, a ratio of {(r['roll_s'] + r['upd_s']) / r['trl_s']:.2f}."]
    lines += ["", NOTES.rstrip()]
    if not args.no_write:
        write_section("ppo", "\n".join(lines))
        print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
