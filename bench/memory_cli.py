"""How fast `llm estimate-memory` answers (the goal: under half a second for a preset with a closed form).

    python bench/memory_cli.py            # 5 runs of each command; updates the memory section of docs/BENCHMARKS.md
    python bench/memory_cli.py --runs 10 --no-write

Each run is a fresh process (`python -m lifecycle estimate-memory ...`), so the
figure includes interpreter start-up and imports: what a user waits for. The
in-process time of `memory.estimate` alone is reported too. No torch is
imported by the command for those; the script checks that as well. Models
without a closed form are traced on fake tensors (torch and transformers are
imported): those commands are timed too, once each, and reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import machine, write_section  # noqa: E402

COMMANDS = [
    ["--model", "llama-2-7b"],
    ["--model", "qwen3-8b", "--method", "qlora", "--gpu-memory", "24GiB"],
    ["--model", "llama-2-7b", "--method", "qlora", "--grad-ckpt", "full", "--gpu-memory", "24GiB"],
    ["--model", "llama-2-70b", "--stage", "ppo", "--method", "lora", "--zero", "3", "--gpus", "8", "--gpu-memory", "80GiB", "--json"],
]


TRACED = [
    ["--model", "mixtral-8x7b", "--method", "lora", "--gpu-memory", "80GiB"],
    ["--model", "gemma-2-9b", "--method", "qlora", "--grad-ckpt", "full", "--gpu-memory", "24GiB"],
]


def time_command(args: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "lifecycle", "estimate-memory", *args], capture_output=True,
                           text=True, cwd=ROOT)
        out.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"llm estimate-memory {' '.join(args)} failed: {r.stderr.strip()}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    probe = subprocess.run([sys.executable, "-c", "import sys, lifecycle.cli, lifecycle.memory; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT)
    torch_free = probe.stdout.strip() == "False"

    from lifecycle import memory

    cfg, _ = memory.load_model_config("llama-2-7b")
    memory.estimate(cfg)
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        memory.estimate(cfg, gpu_memory=80 * memory.GiB)
    in_process = (time.perf_counter() - t) / n

    rows = []
    for args in COMMANDS:
        ts = time_command(args, a.runs)
        rows.append((args, ts))
        print(f"{statistics.median(ts):.3f} s median (min {min(ts):.3f}, max {max(ts):.3f})  llm estimate-memory {' '.join(args)}")
    print(f"in-process memory.estimate(llama-2-7b, --gpu-memory search): {1000 * in_process:.1f} ms; torch imported: {not torch_free}")
    traced = []
    for args in TRACED:
        ts = time_command(args, 1)
        traced.append((args, ts[0]))
        print(f"{ts[0]:.1f} s (traced path)  llm estimate-memory {' '.join(args)}")

    lines = [
        "## `llm estimate-memory` response time",
        "",
        f"Machine: {machine(with_torch=False)}. Command: `python bench/memory_cli.py --runs {a.runs}` "
        f"(each run a fresh process, `python -m lifecycle estimate-memory ...`, interpreter start-up included).",
        "",
        "| command | median (s) | min (s) | max (s) |",
        "|---|---|---|---|",
    ]
    for args, ts in rows:
        lines.append(f"| `llm estimate-memory {' '.join(args)}` | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")
    lines += ["", f"`memory.estimate` itself (Llama-2-7B, with the largest-micro-batch search for `--gpu-memory`): "
                  f"{1000 * in_process:.1f} ms in process. `import lifecycle.cli, lifecycle.memory` loads torch: "
                  f"{'no' if torch_free else 'YES (regression)'}.",
              "", "Architectures without a closed form are traced on fake tensors (torch and transformers imported; "
                  "batch 1 and 2 traced, the micro-batch search extrapolates): one run each.", "",
              "| command | seconds |", "|---|---|"]
    lines += [f"| `llm estimate-memory {' '.join(args)}` | {t:.1f} |" for args, t in traced]
    if not a.no_write:
        write_section("memory", "\n".join(lines))
        print("wrote the memory section of docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
