"""Pretraining throughput and MFU for the default recipe and the GPT-2 124M recipe.

    python bench/pretrain.py                 # both, a few steps each; writes docs/BENCHMARKS.md
    python bench/pretrain.py --steps 5 --no-write

Times the same step the loop runs (forward, backward, clipping, AdamW) on
random tokens, after warm-up steps. MFU = achieved model FLOP/s divided by a
measured dense-matmul peak of this machine (best of five 2048^3 products, in
the recipe's compute dtype), not a datasheet number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import machine, write_section  # noqa: E402

# (name, recipe, preset, vocab, batch, seq) — on a CPU, GPT-2 124M runs batch 1 for a few steps only.
CASES = [
    ("default (llama-tiny)", "recipes/default/pretrain.yaml", "llama-tiny", 309, 32, 64),
    ("GPT-2 124M", "recipes/gpu/pretrain-gpt2-124m.yaml", "gpt2-124m", 32000, 1, 1024),
]


def bench_case(preset: str, vocab: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch

    from lifecycle import training
    from lifecycle.modeling import build_model, count_params, model_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    cfg = model_config(preset, vocab, 0, 1)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(training.param_groups(model, 0.1), lr=1e-4)
    x = torch.randint(0, vocab, (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    tps = batch * seq / dt
    peak = training.measured_peak_flops(device, dtype, n=2048)
    fpt = training.flops_per_token(cfg, seq)
    return {"params": count_params(model)[1], "tokens_per_step": batch * seq, "sec_per_step": dt, "tokens_per_second": tps,
            "peak_flops": peak, "model_flops": tps * fpt, "mfu": tps * fpt / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, recipe, preset, vocab, batch, seq in CASES:
        steps = args.steps if preset != "gpt2-124m" else 2
        r = bench_case(preset, vocab, batch, seq, steps, args.warmup if preset != "gpt2-124m" else 1)
        print(f"{name}: {r['tokens_per_second']:,.0f} tok/s, {r['sec_per_step']:.3f} s/step, MFU {100 * r['mfu']:.1f}% "
              f"(model {r['model_flops'] / 1e9:.1f} GFLOP/s of a measured {r['peak_flops'] / 1e9:.1f} GFLOP/s peak)")
        rows.append((name, recipe, batch, seq, steps, r))
    lines = [
        "## Pretraining throughput and MFU",
        "",
        f"Machine: {machine()}. Command: `python bench/pretrain.py --steps {args.steps}`.",
        "The same step as the training loop (forward, backward, clipping, AdamW) on random tokens, after warm-up;",
        "MFU is model FLOP/s (6 x matmul parameters + attention, per token) over a measured 2048^3 matmul peak.",
        "",
        "| recipe | params | batch x seq | steps timed | s/step | tokens/s | model GFLOP/s | measured peak GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recipe, batch, seq, steps, r in rows:
        lines.append(f"| {name} (`{recipe}`) | {r['params'] / 1e6:.2f}M | {batch} x {seq} | {steps} | {r['sec_per_step']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['model_flops'] / 1e9:.1f} | {r['peak_flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% |")
    if not args.no_write:
        write_section("pretrain", "\n".join(lines))
        print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
