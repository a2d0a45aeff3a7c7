"""`llm reward`: train a reward model on preference pairs with TRL's RewardTrainer.

The reward model is the causal LM's backbone with a one-output linear head
(`AutoModelForSequenceClassification`, num_labels=1) read at the last token;
the loss is -log σ(r_chosen - r_rejected) (Bradley-Terry, as in Ouyang et al.
2022). Full fine-tuning, LoRA, QLoRA or DoRA.

1. check the inputs: the base artifact's kind, the data's columns, the resume
   request; no weights are loaded until all of it is right
2. pairs: the user's, or on the built-in world pairs from --base's own
   samples (2 per prompt at temperature 1) judged by the gold checker, for
   training prompts and, the same way, for held-out prompts
3. tokenize every pair once with `reward_model.encode` (what `score` reads
   later); count sequences longer than max_length (they keep their end)
4. model: the classifier on --base (or --init-from), adapters if asked
5. measure the starting point: held-out pairwise accuracy
6. train; eval accuracy every eval_every steps
7. the final model (adapter merged unless --no-merge), held-out accuracy and margin
8. write the artifact: model, OUT/adapter, tokenizer, OUT/log.jsonl, lifecycle.json
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers.modeling_outputs import SequenceClassifierOutput

from lifecycle import artifacts, finetune, generate, guard, training
from lifecycle.config import RewardConfig
from lifecycle.data import formats, world
from lifecycle.data.files import read_all
from lifecycle.errors import UsageError
from lifecycle.modeling import REWARD_HEAD, count_params, describe_trainable, load_causal_lm, load_for_training
from lifecycle.reward_model import encode, pairwise_accuracy, score_tokens
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import say


def user_pairs(cfg: RewardConfig) -> tuple[list[dict], list[dict]]:
    rows = formats.preference_rows(read_all(cfg.data), prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                                   rejected_column=cfg.rejected_column, chat_template=cfg.chat_template)
    return formats.split_eval(rows, cfg.eval_fraction, cfg.seed)


def world_pairs(cfg: RewardConfig, base_path: str, tokenizer) -> tuple[list[dict], list[dict]]:
    """Pairs from the policy's own samples (chosen right, rejected wrong, by the gold checker)."""
    policy = load_causal_lm(base_path)
    k = cfg.world_samples

    t = time.perf_counter()
    train, acc_train = generate.world_pairs(policy, tokenizer, world.reward_problems(cfg.world_prompts, seed=cfg.seed),
                                            k=k, temperature=cfg.sample_temperature, seed=cfg.seed)
    held, _ = generate.world_pairs(policy, tokenizer, world.heldout_problems(cfg.eval_problems), k=k,
                                   temperature=cfg.sample_temperature, seed=cfg.seed + 1)
    say(f"reward: sampled {k} responses per prompt from {cfg.base} at temperature {cfg.sample_temperature} "
        f"({acc_train:.1%} correct) in {time.perf_counter() - t:.0f}s")
    del policy
    return train, held


def tokenize(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int, int]:
    """(rows with chosen_ids/rejected_ids, sequences truncated, pairs dropped as identical after truncation)."""

    prompts = [p.get("prompt", "") for p in pairs]
    chosen, n1 = encode(tokenizer, prompts, [p["chosen"] for p in pairs], max_length)
    rejected, n2 = encode(tokenizer, prompts, [p["rejected"] for p in pairs], max_length)
    rows = [{"chosen_ids": c, "rejected_ids": r} for c, r in zip(chosen, rejected) if c != r]
    return rows, n1 + n2, len(pairs) - len(rows)


class MaskReadRewardTrainer(trl.RewardTrainer):
    """TRL's RewardTrainer, reading each score where `reward_model.score` reads it: the last attended token.

    The stock classifier finds the last token as the rightmost non-pad token,
    which is one token early when the pad id is also a real token (hub
    tokenizers often pad with EOS, and a plain-text pair ends with EOS). Used
    only then: otherwise both read the same position and the stock path is kept.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = score_tokens(model, inputs["input_ids"], inputs["attention_mask"])  # (2B,) chosen then rejected
        chosen, rejected = torch.chunk(rewards, chunks=2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()  # Bradley-Terry
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            acc = self.accelerator.gather_for_metrics((chosen > rejected).float().mean()).mean().item()
            margin = self.accelerator.gather_for_metrics((chosen - rejected).mean()).mean().item()
        self._metrics[mode]["accuracy"].append(acc)
        self._metrics[mode]["margin"].append(margin)
        return (loss, SequenceClassifierOutput(loss=loss, logits=rewards[:, None])) if return_outputs else loss


def pad_is_real(rows: list[dict], pad_id: int | None) -> bool:
    """Whether the pad id occurs inside some sequence (then the stock classifier would misread the last token)."""
    return pad_id is not None and any(pad_id in r[k] for r in rows for k in ("chosen_ids", "rejected_ids"))


def run(cfg: RewardConfig) -> Path:
    """Run the stage under the --out rules every stage keeps (lifecycle/guard.py): checked before anything is
    written, locked while it runs, left as it was when the run is refused."""
    with guard.claim(cfg):
        return _run(cfg)


def _run(cfg: RewardConfig) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Inputs ------------------------------------------------------------
    info = artifacts.check_artifact(cfg.base, artifacts.CAUSAL_LM, "--base", verify=cfg.verify)
    init = artifacts.check_artifact(cfg.init_from, artifacts.CAUSAL_LM, "--init-from", verify=cfg.verify) if cfg.init_from else info
    resuming = finetune.check_resume(cfg)
    training.check_tracker(cfg)
    guard.before_loading(cfg, info, "reward")
    builtin = not cfg.data
    train_pairs, eval_pairs = ([], []) if builtin else user_pairs(cfg)

    # 2. Pairs -------------------------------------------------------------
    training.quiet()
    finetune.set_threads(cfg)


    tokenizer = load_tokenizer(info.path)
    if builtin:
        train_pairs, eval_pairs = world_pairs(cfg, info.path, tokenizer)
    if formats.is_conversational(train_pairs) and not tokenizer.chat_template:
        raise UsageError(
            f"the tokenizer in {cfg.base} has no chat template, but the pairs are conversational; use a base whose "
            f"tokenizer has one, or give plain-text pairs without a prompt column"
        )
    say(f"reward: {len(train_pairs)} training pairs{' (built-in world)' if builtin else ''}, {len(eval_pairs)} held out")

    # 3. Tokenize ----------------------------------------------------------
    train_rows, truncated, identical = tokenize(tokenizer, train_pairs, cfg.max_length)
    eval_rows, truncated_eval, _ = tokenize(tokenizer, eval_pairs, cfg.max_length)
    if truncated + truncated_eval:
        say(f"reward: {truncated + truncated_eval} sequences are longer than max_length={cfg.max_length} tokens; "
            f"they keep their last {cfg.max_length} tokens (the score is read at the end)")
    if identical:
        say(f"reward: {identical} pairs became identical after truncation and were dropped")
    if not train_rows:
        raise UsageError(f"no training pairs left after truncation to max_length={cfg.max_length}; raise max_length")

    # 4. Model -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = load_for_training(init.path, cfg, head=REWARD_HEAD, pad_token_id=tokenizer.pad_token_id,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    mode = finetune.mode_name(cfg)
    say(f"reward: {mode} training of a reward model on {cfg.init_from or cfg.base}: {describe_trainable(model)}")
    trainable, total = count_params(model)

    # 5. Starting point ----------------------------------------------------
    metrics: dict = {}
    if eval_pairs:
        before = pairwise_accuracy(model, tokenizer, eval_pairs, batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
        metrics.update(eval_accuracy_initial=before["accuracy"], eval_margin_initial=before["margin"])
        say(f"reward: held-out pairwise accuracy before: {before['accuracy']:.3f}")

    # 6. Train -------------------------------------------------------------
    args = finetune.trainer_args(
        trl.RewardConfig, cfg, has_eval=bool(eval_rows), resuming=resuming,
        center_rewards_coefficient=cfg.center_rewards or None,
        disable_dropout=True,
    )
    trainer_cls = MaskReadRewardTrainer if pad_is_real(train_rows + eval_rows, tokenizer.pad_token_id) else trl.RewardTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    finetune.fp32_adapters_without_autocast(trainer, cfg)
    finetune.attach_progress(trainer, cfg)
    t_train = time.perf_counter()
    finetune.train(trainer, cfg, resuming)
    train_seconds = time.perf_counter() - t_train

    # 7. Final model and held-out metrics ----------------------------------
    scratch = out / f".adapter-{os.getpid()}"
    final = finetune.final_model(trainer.model, cfg, init.path, REWARD_HEAD, tokenizer.pad_token_id, scratch)
    if eval_pairs:
        after = pairwise_accuracy(final, tokenizer, eval_pairs, batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
        metrics.update(eval_accuracy=after["accuracy"], eval_margin=after["margin"], eval_mean_score=after["mean_score"],
                       eval_pairs=after["n"])
        say(f"reward: held-out pairwise accuracy {metrics['eval_accuracy_initial']:.3f} -> {after['accuracy']:.3f} "
            f"(margin {after['margin']:.2f})")
    metrics.update(train_pairs=len(train_rows), truncated_sequences=truncated + truncated_eval,
                   trainable_params=trainable, total_params=total, steps=trainer.state.global_step,
                   train_seconds=round(train_seconds, 1), wall_seconds=round(time.perf_counter() - t_start, 1))

    # 8. Artifact ----------------------------------------------------------
    finetune.write_log(out, trainer.state.log_history)
    extra = {"mode": mode, "init_from": artifacts.parent_record(init) if cfg.init_from else None}
    path = finetune.save(final, trainer.model, tokenizer, cfg, stage="reward", metrics=metrics,
                         parent=artifacts.parent_record(info), extra=extra)
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"reward: wrote {path} in {metrics['wall_seconds']:.0f}s")
    return path
