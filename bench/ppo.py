"""PPO throughput: rollout tokens/s and update time per iteration, on the default recipe.

    python bench/ppo.py                       # 12 iterations of recipes/default/ppo.yaml; writes docs/BENCHMARKS.md
    python bench/ppo.py --iterations 6 --no-write
    python bench/ppo.py --policy DIR --reward DIR

Runs the real loop (lifecycle/stages/ppo.py) on runs/default/sft and
runs/default/reward when they exist, else on freshly initialised models of the
same size (llama-tiny with the built-in world's tokenizer), and reads the
per-iteration timings the loop logs to OUT/log.jsonl: generation time (batched
sampling with a KV cache), the whole rollout (generation + actor, reference,
critic and reward-model passes, GAE) and the update (4 epochs x 2 minibatches of
actor and critic forward/backward + AdamW). The first iteration is warm-up and is
left out; the medians of the rest are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


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


def write_section(text: str, path: Path = ROOT / "docs/BENCHMARKS.md") -> None:
    start, end = "<!-- ppo:start -->", "<!-- ppo:end -->"
    block = f"{start}\n{text}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\nFigures written by the scripts in `bench/`; each section names its machine and command.\n"
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S) if start in old else old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--policy", default=str(ROOT / "runs/default/sft"))
    ap.add_argument("--reward", default=str(ROOT / "runs/default/reward"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lifecycle.artifacts import is_complete
    from lifecycle.config import PPOConfig, build_config
    from lifecycle.stages import ppo

    with tempfile.TemporaryDirectory() as tmp:
        if is_complete(args.policy) and is_complete(args.reward):
            policy, reward, models = args.policy, args.reward, f"`{Path(args.policy).relative_to(ROOT) if Path(args.policy).is_relative_to(ROOT) else args.policy}` and its reward model"
        else:
            policy, reward = random_models(Path(tmp))
            models = "untrained llama-tiny policy and reward model (runs/default/sft not found)"
        out = Path(tmp) / "ppo"
        cfg = build_config(PPOConfig, str(ROOT / "recipes/default/ppo.yaml"), {
            "policy": policy, "reward": reward, "out": str(out), "max_steps": args.iterations,
            "eval_every": 10_000, "eval_prompts": 50, "save_every": 0, "log_every": 10_000})
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        t0 = time.perf_counter()
        ppo.run(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    its = [r for r in rows if "rollout_seconds" in r][1:]  # drop the warm-up iteration
    med = lambda k: statistics.median(r[k] for r in its)  # noqa: E731
    gen_tps, gen_s, roll_s, upd_s = med("rollout_tokens_per_second"), med("generate_seconds"), med("rollout_seconds"), med("update_seconds")
    tokens = statistics.median(r["response_length"] for r in its) * cfg.prompts_per_rollout
    print(f"rollout: {gen_tps:,.0f} generated tokens/s ({gen_s:.2f} s to sample {tokens:.0f} tokens), "
          f"whole rollout {roll_s:.2f} s | update {upd_s:.2f} s | {roll_s + upd_s:.2f} s per iteration | load avg {load:.1f}")
    lines = [
        "## PPO: rollout and update time per iteration",
        "",
        f"Machine: {machine()}. Command: `python bench/ppo.py --iterations {args.iterations}`.",
        f"Models: {models}; recipe `recipes/default/ppo.yaml` (128 prompts, up to 5 new tokens, 4 epochs x 2 minibatches of 64).",
        f"Medians over iterations 2-{args.iterations}; the machine's 1-minute load average at the start was {load:.1f}"
        + (" (other jobs shared the cores, so these times are inflated)" if load > 1.5 else "") + ".",
        "",
        "| phase | per iteration |",
        "|---|---|",
        f"| generation (batched sampling, KV cache) | {gen_s:.2f} s, {gen_tps:,.0f} generated tokens/s ({tokens:.0f} tokens) |",
        f"| whole rollout (generation + actor, reference, critic, reward passes + GAE) | {roll_s:.2f} s |",
        f"| update (8 minibatch steps: actor and critic forward/backward, clipping, AdamW) | {upd_s:.2f} s |",
        f"| iteration | {roll_s + upd_s:.2f} s |",
        "",
        f"Whole run including loading and the initial and final held-out evaluation: {wall:.0f} s for {args.iterations} iterations.",
    ]
    if not args.no_write:
        write_section("\n".join(lines))
        print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
