"""`llm sft`: supervised fine-tuning with TRL's SFTTrainer (full, LoRA, QLoRA or DoRA).

1. check the inputs: the base artifact's kind, the data's shape, the resume
   request; no weights are loaded until all of it is right
2. tokenizer: the chat template must exist for chat data; count rows longer
   than max_length (TRL truncates them)
3. model: full weights, or adapters (LoRA / 4-bit QLoRA / DoRA); print the
   trainable share
4. measure the starting point (built-in world: greedy gold accuracy)
5. train: TRL applies the chat template and masks the loss to the
   assistant/completion tokens; eval loss on the held-out split
6. the final model (adapter merged unless --no-merge), held-out metrics
7. write the artifact: model, OUT/adapter, tokenizer, OUT/log.jsonl, lifecycle.json
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback

from lifecycle import artifacts, finetune, guard, training
from lifecycle.config import SFTConfig
from lifecycle.data import chat as chat_templates
from lifecycle.data import formats, world
from lifecycle.data.files import read_all
from lifecycle.errors import UsageError
from lifecycle.generate import gold_accuracy
from lifecycle.modeling import CAUSAL_HEAD, count_params, describe_trainable, load_for_training
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import say


def load_rows(cfg: SFTConfig) -> tuple[str, list[dict], list[dict]]:
    """(shape, train rows, eval rows) in TRL's columns, from the user's data or the built-in world."""
    if not cfg.data:
        return (formats.PROMPT_COMPLETION, world.sft_examples(cfg.world_examples, seed=cfg.seed),
                world.sft_examples(cfg.eval_problems, seed=cfg.seed, heldout=True) if cfg.eval_problems else [])
    shape, rows = formats.sft_rows(
        read_all(cfg.data, cfg.text_column), messages_column=cfg.messages_column, prompt_column=cfg.prompt_column,
        completion_column=cfg.completion_column, text_column=cfg.text_column, chat_template=cfg.chat_template,
    )
    train, held = formats.split_eval(rows, cfg.eval_fraction, cfg.seed)
    return shape, train, held


def token_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens per row as TRL will tokenize it (chat template for message lists)."""
    out = []
    for r in rows:
        if "messages" in r:
            ids = tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        elif "prompt" in r and isinstance(r["prompt"], list):
            ids = tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=True)["input_ids"]
        elif "prompt" in r:
            ids = tokenizer(r["prompt"] + r["completion"])["input_ids"]
        else:
            ids = tokenizer(r["text"])["input_ids"]
        out.append(len(ids))
    return out


def gold_callback(tokenizer, problems: list, initial: dict):
    """At every evaluation, greedy gold accuracy on the held-out problems, into the trainer's log history
    (so OUT/log.jsonl has the curve, and a resumed run keeps the earlier points)."""


    class GoldAccuracy(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kw):
            acc = initial if state.global_step == 0 else gold_accuracy(model, tokenizer, problems)
            state.log_history.append({"step": state.global_step, **{k: v for k, v in acc.items() if k != "n"}})
            if state.is_world_process_zero:
                print(f"step {state.global_step:>5}/{state.max_steps}  gold_accuracy {acc['gold_accuracy']:.3f} "
                      f"(carry {acc['gold_accuracy_carry']:.3f}, no carry {acc['gold_accuracy_nocarry']:.3f})", flush=True)

    return GoldAccuracy()


def build_trainer(cfg: SFTConfig, model, tokenizer, train_rows: list[dict], eval_rows: list[dict], *, resuming: bool):
    """TRL's SFTTrainer on these rows, with the loss on the assistant's tokens (or every token, loss_on=all).

    Our own tokenizer's template marks assistant tokens with {% generation %}
    and TRL masks them. A hub template has no such markers: then we find each
    assistant turn ourselves, through its end-of-turn marker (data/chat.py), and
    hand TRL token ids with `assistant_masks`, from which it builds the labels.
    """

    chat = formats.is_conversational(train_rows)
    messages = bool(train_rows) and "messages" in train_rows[0]
    own_masks = chat and cfg.loss_on == "assistant" and not chat_templates.has_generation_markers(tokenizer)
    train_data, eval_data = train_rows, eval_rows
    if own_masks:
        train_data, skipped = chat_templates.tokenize_conversations(tokenizer, train_rows)
        eval_data, skipped_eval = chat_templates.tokenize_conversations(tokenizer, eval_rows)
        if skipped + skipped_eval:
            say(f"sft: {skipped + skipped_eval} assistant turns are rendered differently by the chat template "
                f"later in their conversation; they are left out of the loss")
    args = finetune.trainer_args(
        trl.SFTConfig, cfg, has_eval=bool(eval_rows), resuming=resuming,
        packing=cfg.packing,
        completion_only_loss=cfg.loss_on == "assistant" and not own_masks,
        assistant_only_loss=cfg.loss_on == "assistant" and messages and not own_masks,
        dataset_text_field="text",
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_data),
        eval_dataset=Dataset.from_list(eval_data) if eval_data else None,
        processing_class=tokenizer,
    )


def run(cfg: SFTConfig) -> Path:
    """Run the stage under the --out rules every stage keeps (lifecycle/guard.py): checked before anything is
    written, locked while it runs, left as it was when the run is refused."""
    with guard.claim(cfg):
        return _run(cfg)


def _run(cfg: SFTConfig) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Inputs ------------------------------------------------------------
    info = artifacts.check_artifact(cfg.base, artifacts.CAUSAL_LM, "--base", verify=cfg.verify)
    requested = dataclasses.replace(cfg)  # what checkpoints record: the options as asked, before resolving
    cfg.max_length = finetune.inherit_max_length(cfg, info)  # 0: the parent's training length
    resuming = finetune.check_resume(requested)
    training.check_tracker(cfg)
    guard.before_loading(cfg, info, "sft")
    shape, train_rows, eval_rows = load_rows(cfg)
    builtin = not cfg.data
    say(f"sft: {len(train_rows)} training rows ({shape}{', built-in world' if builtin else ''}), {len(eval_rows)} held out")

    # 2. Tokenizer ---------------------------------------------------------
    training.quiet()
    finetune.set_threads(cfg)


    tokenizer = load_tokenizer(info.path)
    chat = formats.is_conversational(train_rows)
    if chat and not tokenizer.chat_template:
        raise UsageError(
            f"the tokenizer in {cfg.base} has no chat template, but the data is conversational; "
            f"use a base whose tokenizer has one (every `llm pretrain` tokenizer does), or give plain text "
            f"(--set chat_template=false for prompt/completion strings)"
        )
    lengths = token_lengths(tokenizer, train_rows + eval_rows)
    too_long = sum(n > cfg.max_length for n in lengths)
    if too_long and not cfg.packing:
        say(f"sft: {too_long} of {len(lengths)} rows are longer than max_length={cfg.max_length} tokens "
            f"(longest {max(lengths)}); they are truncated to their first {cfg.max_length} tokens")

    # 3. Model -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = load_for_training(info.path, cfg, head=CAUSAL_HEAD, gradient_checkpointing=cfg.gradient_checkpointing)
    mode = finetune.mode_name(cfg)
    say(f"sft: {mode} fine-tuning of {cfg.base}: {describe_trainable(model)}")
    trainable, total = count_params(model)

    # 4. Starting point ----------------------------------------------------
    metrics: dict = {}
    problems = world.heldout_problems(cfg.eval_problems) if builtin and cfg.eval_problems else []
    if problems:
        before = gold_accuracy(model, tokenizer, problems)
        metrics.update({f"{k}_initial": v for k, v in before.items() if k != "n"})
        say(f"sft: gold accuracy before: {before['gold_accuracy']:.3f} on {before['n']} held-out problems")

    # 5. Train -------------------------------------------------------------
    trainer = build_trainer(cfg, model, tokenizer, train_rows, eval_rows, resuming=resuming)
    dropped = len(train_rows) - len(trainer.train_dataset) if not cfg.packing else 0
    if dropped > 0:
        say(f"sft: {dropped} rows had no completion tokens left within max_length={cfg.max_length} and were dropped")
    if len(trainer.train_dataset) == 0:
        raise UsageError(f"no training rows left after truncation to max_length={cfg.max_length}; raise max_length")
    if eval_rows and len(trainer.eval_dataset) == 0:
        say(f"sft: no held-out row keeps a completion token within max_length={cfg.max_length}; training without eval loss")
        finetune.drop_eval(trainer)
        eval_rows = []
    finetune.fp32_adapters_without_autocast(trainer, cfg)
    finetune.attach_progress(trainer, requested)
    if problems and eval_rows:
        trainer.add_callback(gold_callback(tokenizer, problems, before))
    t_train = time.perf_counter()
    finetune.train(trainer, cfg, resuming)
    train_seconds = time.perf_counter() - t_train

    # 6. Final model and held-out metrics ----------------------------------
    scratch = out / f".adapter-{os.getpid()}"
    final = finetune.final_model(trainer.model, cfg, info.path, CAUSAL_HEAD, None, scratch)
    if eval_rows:
        metrics["eval_loss"] = finetune.final_eval(trainer)["eval_loss"]
    if problems:
        after = gold_accuracy(final, tokenizer, problems)
        metrics.update({k: v for k, v in after.items() if k != "n"})
        metrics["gold_problems"] = after["n"]
        say(f"sft: gold accuracy {metrics['gold_accuracy_initial']:.3f} -> {after['gold_accuracy']:.3f} "
            f"(carry {after['gold_accuracy_carry']:.3f}, no carry {after['gold_accuracy_nocarry']:.3f})")
    metrics.update(train_rows=len(train_rows), eval_rows=len(eval_rows), truncated_rows=too_long,
                   trainable_params=trainable, total_params=total, steps=trainer.state.global_step,
                   train_seconds=round(train_seconds, 1), wall_seconds=round(time.perf_counter() - t_start, 1))

    # 7. Artifact ----------------------------------------------------------
    finetune.write_log(out, trainer.state.log_history)
    path = finetune.save(final, trainer.model, tokenizer, cfg, stage="sft", metrics=metrics,
                         parent=artifacts.parent_record(info), extra={"mode": mode})
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"sft: wrote {path} in {metrics['wall_seconds']:.0f}s" + (f" (eval_loss {metrics['eval_loss']:.4f})" if "eval_loss" in metrics else ""))
    return path
