"""The baseline of the PPO speed goal: TRL's last PPOTrainer (trl 0.29, `trl.experimental.ppo`) on our models.

TRL 1.x ships no PPO, so this runs in a separate environment that `bench/ppo.py --trl-python` points at:

    python3.11 -m venv /tmp/trl029 && /tmp/trl029/bin/pip install torch==2.13.0 "trl==0.29.*"
    python bench/ppo.py --trl-python /tmp/trl029/bin/python      # ours and TRL's, interleaved
    /tmp/trl029/bin/python bench/trl_ppo.py --sft runs/default/sft --reward runs/default/reward --n 10

Matched to `recipes/default/ppo.yaml`: the SFT model as policy and reference, the reward model
as reward and as the value model's start (`critic: reward`), 128 prompts of the built-in world
per PPO step rendered with the SFT model's chat template, responses of up to 5 tokens at
temperature 1, 4 epochs x 2 minibatches of 64 (per_device_train_batch_size 128, num_mini_batches
2), lr 5e-5, KL coefficient 0.15, missing-EOS penalty 1, fp32, one torch thread by default.
Differences that remain are TRL's own: one learning rate for actor and critic, rollout passes in
chunks of 64, `gc.collect()` between phases. Prints one line `RESULT {json}` with the seconds of
every PPO step (a training callback's clock) and their median over steps 3..N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

EPISODES = 128  # per PPO step, as prompts_per_rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default=str(ROOT / "runs/default/sft"))
    ap.add_argument("--reward", default=str(ROOT / "runs/default/reward"))
    ap.add_argument("--n", type=int, default=10, help="PPO steps of 128 episodes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback,
                              TrainerCallback)
    from transformers.utils import logging as hf_logging

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:  # trl < 0.2x kept it at the top level
        from trl import PPOConfig, PPOTrainer
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT))
    from lifecycle.data import world  # standard library only: importable beside any trl

    tok = AutoTokenizer.from_pretrained(a.sft)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(a.sft, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(a.sft, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)

    def encode(q: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    questions = [r["prompt"][0]["content"] for r in world.ppo_prompts(4 * EPISODES, seed=a.seed)]
    ds = Dataset.from_dict({"input_ids": [encode(q) for q in questions]})
    cfg = PPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "trl_ppo_bench"), per_device_train_batch_size=EPISODES,
        gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=4, response_length=5, temperature=1.0,
        kl_coef=0.15, learning_rate=5e-5, stop_token="eos", missing_eos_penalty=1.0, total_episodes=EPISODES * a.n,
        num_sample_generations=0, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, seed=a.seed, dataloader_num_workers=0)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []  # the start of training, then the end of every PPO step

        def on_train_begin(self, *_, **__):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    clock = Clock()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(8)), callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    c = trainer.args
    assert (c.local_batch_size, c.local_mini_batch_size, c.num_ppo_epochs) == (EPISODES, 64, 4), "batch shape drifted"
    trainer.train()
    steps = [b - x for x, b in zip(clock.marks, clock.marks[1:])]
    print("RESULT " + json.dumps({"trl": trl.__version__, "threads": a.threads, "steps": steps,
                                  "median_s": statistics.median(steps[2:] or steps)}))


if __name__ == "__main__":
    main()
