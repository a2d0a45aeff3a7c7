"""The prepared GPU check: real-size random-weight models, a few steps of each stage, memory and speed.

For each case it builds a model from a published architecture (no download:
random weights from the preset's config), writes it as a hub-style directory with
a ChatML tokenizer, runs the stage itself (`lifecycle.stages.*.run`) for a few
steps on synthetic data whose rows fill `seq` tokens, and records

* the estimator's per-GPU prediction for that run against `torch.cuda.max_memory_allocated`;
* tokens/s over the training steps and MFU against the card's published dense bf16 peak
  (6N FLOPs per token for full fine-tuning, 4N with frozen base weights, plus attention).

    python bench/gpu_check.py --out /tmp/gpu_check [--budget-s 420] [--cases sft-0.6b,sft-qlora-8b,...]

Writes OUT/gpu_check.json; `python bench/gpu_check.py --report OUT/gpu_check.json` turns it into
a section of docs/BENCHMARKS.md. Cases run cheapest first and stop when the time budget is spent.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# name: (preset, stage, method, micro-batch, seq, steps, gradient checkpointing)
CASES = {
    "sft-0.6b": ("qwen3-0.6b", "sft", "full", 4, 2048, 12, False),
    "reward-0.6b-lora": ("qwen3-0.6b", "reward", "lora", 4, 2048, 8, False),
    "sft-qlora-8b": ("qwen3-8b", "sft", "qlora", 4, 2048, 6, True),
    # PPO with LoRA on the shared base, the reward model being reward-0.6b-lora's adapter (run that case first);
    # micro-batch = episodes per forward/backward, seq = prompt + 64 new tokens.
    "ppo-0.6b-lora": ("qwen3-0.6b", "ppo", "lora", 16, 96, 3, False),
    # `--cases smoke --smoke`: the same code on a tiny model, on whatever device there is (checks the script).
    "smoke": ("llama-tiny", "sft", "lora", 2, 64, 2, False),
}

# Published dense bf16 peaks (NVIDIA datasheets, without sparsity), FLOP/s.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def flops_per_token(n_params: int, n_trainable: int, layers: int, hidden: int, seq: int) -> float:
    """Forward 2N, backward 2N for activation grads plus 2N_trainable for weight grads; attention
    scores and values add 2·2·L·s·h forward (causal halves it; we count it whole, as PaLM's MFU does)."""
    attn = 12 * layers * hidden * seq
    return 4 * n_params + 2 * n_trainable + attn


def build_base(preset: str, out: Path, tok) -> dict:
    """Random weights of the preset's architecture, bf16, saved as a hub-style directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lifecycle.memory import load_model_config

    conf, _ = load_model_config(preset)
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    cfg = AutoConfig.for_model(**conf)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"config": cfg.to_dict(), "params": n}


def write_data(path: Path, tok, stage: str, seq: int, rows: int) -> None:
    """Rows that fill `seq` tokens (truncated there), so every step sees batch x seq tokens."""
    import random

    rng = random.Random(0)
    words = [f"{a} plus {b} equals {a + b} ." for a in range(10, 99) for b in range(10, 99, 7)]
    per = len(tok(words[0])["input_ids"])
    long = lambda: " ".join(rng.choice(words) for _ in range(seq // per + 8))  # noqa: E731
    with path.open("w") as f:
        for _ in range(rows):
            if stage == "sft":
                r = {"messages": [{"role": "user", "content": "recite some sums"}, {"role": "assistant", "content": long()}]}
            else:
                text = long()
                r = {"chosen": text, "rejected": text[::-1]}
            f.write(json.dumps(r) + "\n")


def run_case(name: str, work: Path, tok) -> dict:
    import torch

    from lifecycle import memory
    from lifecycle.config import RewardConfig, SFTConfig, build_config
    from lifecycle.stages import reward, sft

    preset, stage, method, batch, seq, steps, ckpt = CASES[name]
    base = work / f"base-{preset}"
    t0 = time.perf_counter()
    info = json.loads((base / "info.json").read_text()) if (base / "info.json").exists() else None
    if info is None:
        info = build_base(preset, base, tok)
        (base / "info.json").write_text(json.dumps(info))
    t_build = time.perf_counter() - t0
    if stage == "ppo":
        return run_ppo_case(name, work, base, info, t_build)
    data = work / f"{name}.jsonl"
    write_data(data, tok, stage, seq, rows=batch * (steps + 2))
    values = dict(base=str(base), out=str(work / f"out-{name}"), data=str(data), max_steps=steps, batch_size=batch,
                  grad_accum=1, max_length=seq, warmup_steps=0, save_every=0, log_every=1, eval_fraction=0.0,
                  mixed_precision="bf16", gradient_checkpointing=ckpt, merge=stage == "reward", lr=1e-5,
                  cpu_threads=0)
    if method != "full":
        values[method] = True
    cls, mod = (SFTConfig, sft) if stage == "sft" else (RewardConfig, reward)
    cfg = build_config(cls, None, values)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    path = mod.run(cfg)
    wall = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    m = json.loads((Path(path) / "lifecycle.json").read_text())["metrics"]
    seqs = batch * (2 if stage == "reward" else 1)  # a reward step reads chosen and rejected
    tokens = steps * seqs * seq
    tps = tokens / m["train_seconds"]
    conf = info["config"]
    est = memory.estimate(conf, stage=stage, method=method, batch_size=batch, seq_len=seq, dtype="bf16",
                          grad_ckpt="full" if ckpt else "none", lora_r=cfg.lora_r, device="cuda" if cuda else "cpu",
                          grad_accum=1, lora_dropout=cfg.lora_dropout if method != "full" else 0.0)
    fpt = flops_per_token(m["total_params"], m["trainable_params"], conf["num_hidden_layers"], conf["hidden_size"], seq)
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    peak_f = peak_flops(dev)
    return {
        "case": name, "preset": preset, "stage": stage, "method": method, "batch": batch, "seq": seq, "steps": steps,
        "grad_ckpt": ckpt, "params": info["params"], "trainable": m["trainable_params"],
        "estimate_bytes": est.total_bytes, "measured_bytes": peak,
        "estimate_rows": {k: v for k, v in est.to_dict().items() if isinstance(v, (int, float))},
        "estimate_without_overhead": est.total_bytes - est.to_dict().get("overhead_bytes", 0),
        "tokens_per_s": tps, "mfu": (tps * fpt / peak_f) if peak_f else None, "train_seconds": m["train_seconds"],
        "stage_wall_s": wall, "build_s": t_build, "device": dev,
    }


def run_ppo_case(name: str, work: Path, base: Path, info: dict, t_build: float) -> dict:
    """A few PPO iterations on the built-in world's prompts: the four roles on one shared bf16 base."""
    import torch

    from lifecycle import memory
    from lifecycle.config import PPOConfig, build_config
    from lifecycle.stages import ppo

    preset, stage, method, micro, seq, steps, _ = CASES[name]
    reward_case = next(n for n, c in CASES.items() if c[0] == preset and c[1] == "reward")
    reward_dir = work / f"out-{reward_case}"
    if not (reward_dir / "lifecycle.json").exists():
        raise RuntimeError(f"run the {reward_case} case first: PPO reads its reward model")
    cfg = build_config(PPOConfig, None, dict(
        policy=str(base), reward=str(reward_dir), out=str(work / f"out-{name}"), lora=True, max_steps=steps,
        prompts_per_rollout=64, minibatch_size=32, micro_batch_size=micro, ppo_epochs=1, max_new_tokens=seq - 32,
        world_prompts=256, eval_prompts=32, eval_every=100, gate_samples=32, save_every=0,
        mixed_precision="bf16", lr=1e-5))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    path = ppo.run(cfg)
    wall = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated()
    m = json.loads((Path(path) / "lifecycle.json").read_text())["metrics"]
    est = memory.estimate(info["config"], stage="ppo", method=method, batch_size=micro, seq_len=seq, dtype="bf16",
                          lora_r=cfg.lora_r, device="cuda")
    episodes = steps * cfg.prompts_per_rollout
    return {
        "case": name, "preset": preset, "stage": stage, "method": method, "batch": micro, "seq": seq, "steps": steps,
        "grad_ckpt": False, "params": info["params"], "trainable": m.get("trainable_params"),
        "estimate_bytes": est.total_bytes, "measured_bytes": peak,
        "estimate_rows": {k: v for k, v in est.to_dict().items() if isinstance(v, (int, float))},
        "estimate_without_overhead": est.total_bytes - est.to_dict().get("overhead_bytes", 0),
        "tokens_per_s": episodes * seq / wall, "episodes_per_s": episodes / wall, "mfu": None,
        "train_seconds": wall, "stage_wall_s": wall, "build_s": t_build, "device": torch.cuda.get_device_name(),
        "metrics": {k: m[k] for k in ("kl", "score", "eval_score") if k in m},
    }


def main() -> None:
    from _report import case_args, machine, run_cases

    args = case_args("gpu_check", [c for c in CASES if c != "smoke"], 420.0, "allow running without CUDA (for `--cases smoke`)")
    if args.report:
        return report(Path(args.report))
    from families import chatml_tokenizer

    out = args.out
    tok = chatml_tokenizer()
    results = {"machine": machine(), "command": f"python bench/gpu_check.py --cases {args.cases}", "cases": []}
    run_cases(args.cases.split(","), lambda name: run_case(name, out, tok), results, args.json, args.budget_s)


def report(path: Path) -> None:
    from _report import unfinished_row, write_section

    res = json.loads(path.read_text())
    gib = 2**30
    lines = [
        "## GPU check: real-size models, random weights, a few steps of each stage",
        "",
        f"`{res['command']}` on {res['machine']}. Each row runs the stage itself on a random-weight model built",
        "from the preset's published architecture (no download) and compares the estimator's prediction",
        "(`llm estimate-memory` with the same settings) with `torch.cuda.max_memory_allocated` over the run;",
        "tokens/s over the training steps (first step included), MFU against the card's dense bf16 peak;",
        "for PPO, sequence tokens (prompt + response) per second of the whole stage (rollouts, scoring, updates).",
        "",
        "`max_memory_allocated` counts tensors only, so it is set against the estimate without its overhead row",
        "(CUDA context and allocator margin, which `llm estimate-memory` adds for the verdict).",
        "",
        "| case | model | method | micro-batch x seq | estimate (tensors) | measured | est/meas | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        if (row := unfinished_row(c, 9)) is not None:
            lines.append(row)
            continue
        est = c.get("estimate_without_overhead", c["estimate_bytes"])
        ratio = est / c["measured_bytes"]
        mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") else "n/a"
        lines.append(f"| {c['case']} | {c['preset']} ({c['params'] / 1e9:.2f}B) | {c['method']}{' + ckpt' if c['grad_ckpt'] else ''} "
                     f"| {c['batch']} x {c['seq']} | {est / gib:.1f} GiB | {c['measured_bytes'] / gib:.1f} GiB "
                     f"| {ratio:.2f} | {c['tokens_per_s']:,.0f} | {mfu} |")
    write_section("gpu_check", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
