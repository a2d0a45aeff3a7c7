"""`llm dpo`: direct preference optimisation with TRL's DPOTrainer (full, LoRA, QLoRA or DoRA).

DPO (Rafailov et al. 2023, arXiv:2305.18290) fits the policy to preference
pairs without a reward model or rollouts: with the implicit reward
r(x, y) = β·log π(y|x)/π_ref(y|x), the loss is -log σ(r(x, y_w) - r(x, y_l)).
The reference is --base, frozen (with adapters: the same weights with the
adapter disabled, so no second copy). docs/alignment.md has the equations.

1. check the inputs: the base artifact's kind, the pairs' columns, the resume
   request, the memory estimate; no weights are loaded until all of it is right
2. pairs: the user's, or on the built-in world pairs from --base's own samples
   judged by the gold checker (`llm reward`'s recipe), for training prompts and
   held-out prompts alike
3. model: full weights (+ a frozen copy as the reference), or adapters
4. measure the starting point: greedy gold accuracy on held-out problems
5. train: TRL's DPOTrainer; held-out preference accuracy and margin every eval_every steps
6. the final model (adapter merged unless --no-merge); held-out preference
   accuracy and implicit reward margin, gold accuracy, KL to the reference
7. write the artifact: model, OUT/adapter, tokenizer, OUT/log.jsonl, lifecycle.json
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset

from lifecycle import artifacts, finetune, generate, guard, training
from lifecycle.config import DPOConfig
from lifecycle.data import formats, world
from lifecycle.data.files import read_all
from lifecycle.errors import UsageError
from lifecycle.generate import gold_accuracy, kl_to_reference, render_prompts
from lifecycle.modeling import CAUSAL_HEAD, count_params, describe_trainable, load_causal_lm, load_for_training
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import say



# ---------------------------------------------------------------------------
# 2. Pairs
# ---------------------------------------------------------------------------
def user_pairs(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    rows = formats.preference_rows(read_all(cfg.data), prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                                   rejected_column=cfg.rejected_column, chat_template=cfg.chat_template)
    if "prompt" not in rows[0]:
        raise UsageError(f"the pairs have no {cfg.prompt_column!r} column; DPO compares two responses to one prompt: "
                         f"add the prompt column, or name yours with --set prompt_column=NAME")
    return formats.split_eval(rows, cfg.eval_fraction, cfg.seed)


def world_pairs(cfg: DPOConfig, policy, tokenizer) -> tuple[list[dict], list[dict], float]:
    """Pairs from the policy's own samples (chosen right, rejected wrong, by the gold checker), as `llm reward`
    builds them; and the share of the training samples that were right."""
    train, share = generate.world_pairs(policy, tokenizer, world.reward_problems(cfg.world_prompts, seed=cfg.seed),
                                        k=cfg.world_samples, temperature=cfg.sample_temperature, seed=cfg.seed)
    held = generate.world_pairs(policy, tokenizer, world.heldout_problems(cfg.eval_problems), k=cfg.world_samples,
                                temperature=cfg.sample_temperature, seed=cfg.seed + 1)[0] if cfg.eval_problems else []
    return train, held, share


def run(cfg: DPOConfig) -> Path:
    """Run the stage under the --out rules every stage keeps (lifecycle/guard.py)."""
    with guard.claim(cfg):
        return _run(cfg)


def _run(cfg: DPOConfig) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Inputs ------------------------------------------------------------
    info = artifacts.check_artifact(cfg.base, artifacts.CAUSAL_LM, "--base", verify=cfg.verify)
    resuming = finetune.check_resume(cfg)
    training.check_tracker(cfg)
    guard.before_loading(cfg, info, "dpo")
    builtin = not cfg.data
    train_pairs, eval_pairs = ([], []) if builtin else user_pairs(cfg)

    # 2. Pairs -------------------------------------------------------------
    training.quiet()
    finetune.set_threads(cfg)
    tokenizer = load_tokenizer(info.path)
    if (builtin or formats.is_conversational(train_pairs)) and not tokenizer.chat_template:
        raise UsageError(f"the tokenizer in {cfg.base} has no chat template, but the pairs are conversational; use a "
                         f"base whose tokenizer has one, or give plain-text pairs (--set chat_template=false)")
    reference = load_causal_lm(info.path)  # frozen: the sampler of the built-in pairs, and DPO's reference (full)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    share = None
    if builtin:
        t = time.perf_counter()
        train_pairs, eval_pairs, share = world_pairs(cfg, reference, tokenizer)
        say(f"dpo: sampled {cfg.world_samples} responses per prompt from {cfg.base} at temperature "
            f"{cfg.sample_temperature} ({share:.1%} correct) in {time.perf_counter() - t:.0f}s")
    say(f"dpo: {len(train_pairs)} training pairs{' (built-in world)' if builtin else ''}, {len(eval_pairs)} held out")

    # 3. Model -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = load_for_training(info.path, cfg, head=CAUSAL_HEAD, gradient_checkpointing=cfg.gradient_checkpointing)
    mode = finetune.mode_name(cfg)
    say(f"dpo: {mode} training of {cfg.base} (β={cfg.beta}, loss {cfg.loss_type}): {describe_trainable(model)}; "
        f"reference: {'the base with the adapter disabled' if cfg.use_peft else 'a frozen copy of the base'}")
    trainable, total = count_params(model)

    # 4. Starting point ----------------------------------------------------
    metrics: dict = {}
    problems = world.heldout_problems(cfg.eval_problems) if cfg.eval_problems and builtin else []
    if problems:
        before = gold_accuracy(reference, tokenizer, problems)
        metrics.update({f"{k}_initial": v for k, v in before.items() if k != "n"})
        say(f"dpo: gold accuracy before: {before['gold_accuracy']:.3f} on {before['n']} held-out problems")

    if cfg.use_peft:  # the reference is the base with the adapter disabled: no second copy while training
        reference = None

    # 5. Train -------------------------------------------------------------
    args = finetune.trainer_args(
        trl.DPOConfig, cfg, has_eval=bool(eval_pairs), resuming=resuming,
        beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),  # RPO: + sft_weight x NLL of the chosen
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        disable_dropout=True, gradient_checkpointing=cfg.gradient_checkpointing,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None if cfg.use_peft else reference,
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
    )
    finetune.fp32_adapters_without_autocast(trainer, cfg)
    finetune.attach_progress(trainer, cfg)
    t_train = time.perf_counter()
    finetune.train(trainer, cfg, resuming)  # Ctrl-C/SIGTERM: a checkpoint, then Interrupted (exit 130)
    train_seconds = time.perf_counter() - t_train

    # 6. Final model and held-out metrics ----------------------------------
    scratch = out / f".adapter-{os.getpid()}"
    final = finetune.final_model(trainer.model, cfg, info.path, CAUSAL_HEAD, None, scratch)
    final.eval()
    if eval_pairs:
        ev = finetune.final_eval(trainer)
        metrics.update(eval_loss=ev["eval_loss"], eval_accuracy=ev.get("eval_rewards/accuracies"),
                       eval_margin=ev.get("eval_rewards/margins"), eval_pairs=len(eval_pairs))
        start = next((e for e in trainer.state.log_history if e.get("step") == 0 and "eval_loss" in e), None)
        if start is not None:  # the evaluation before the first step (π = π_ref: every implicit reward is 0)
            metrics.update(eval_accuracy_initial=start.get("eval_rewards/accuracies"),
                           eval_margin_initial=start.get("eval_rewards/margins"))
        say(f"dpo: held-out preference accuracy {metrics['eval_accuracy']:.3f}, implicit reward margin "
            f"{metrics['eval_margin']:.3f}")
    if problems:
        after = gold_accuracy(final, tokenizer, problems)
        metrics.update({k: v for k, v in after.items() if k != "n"})
        metrics["gold_problems"] = after["n"]
        say(f"dpo: gold accuracy {metrics['gold_accuracy_initial']:.3f} -> {after['gold_accuracy']:.3f} "
            f"(carry {after['gold_accuracy_carry']:.3f}, no carry {after['gold_accuracy_nocarry']:.3f})")
    if cfg.kl_samples:
        reference = reference if reference is not None else load_causal_lm(info.path).eval()
        held = [p["prompt"] for p in eval_pairs] or [p["prompt"] for p in train_pairs]
        held = render_prompts(tokenizer, held[: cfg.kl_samples])
        metrics["kl"] = kl_to_reference(final, reference, tokenizer, held, max_new_tokens=6, seed=cfg.seed)
        say(f"dpo: KL to the reference {metrics['kl']:.3f} nats per response")
    metrics.update(train_pairs=len(train_pairs), sampled_correct=share, trainable_params=trainable, total_params=total,
                   steps=trainer.state.global_step, train_seconds=round(train_seconds, 1),
                   wall_seconds=round(time.perf_counter() - t_start, 1))

    # 7. Artifact ----------------------------------------------------------
    finetune.write_log(out, trainer.state.log_history)
    path = finetune.save(final, trainer.model, tokenizer, cfg, stage="dpo", metrics=metrics,
                         parent=artifacts.parent_record(info), extra={"mode": mode})
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"dpo: wrote {path} in {metrics['wall_seconds']:.0f}s")
    return path
