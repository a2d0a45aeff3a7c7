"""What the TRL-based stages (sft, reward) share around the trainer.

TRL's trainers do the training, checkpointing and resuming (they are
transformers Trainers). This module only maps our config onto their arguments,
prints one progress line every `log_every` steps, writes OUT/log.jsonl from the
trainer's log history, and writes the artifact: the full model, or the adapter
in OUT/adapter plus (unless --no-merge) the adapter merged into a plain model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lifecycle import artifacts, checkpoints
from lifecycle.errors import UsageError
from lifecycle.artifacts import quiet_saving
from lifecycle.training import format_eta, tensorboard_dir


# ---------------------------------------------------------------------------
# Checkpoints (the Trainer's own: OUT/checkpoints/checkpoint-N; see lifecycle/checkpoints.py)
# ---------------------------------------------------------------------------
def check_resume(cfg: Any) -> bool:
    """True when training should resume; UsageError for --resume without a checkpoint or under another recipe.

    The Trainer resumes from its highest-numbered checkpoint whether or not a kill
    cut it short; incomplete ones are removed first, so it continues from the newest
    complete one, the one `llm run` found.
    """
    if not cfg.resume:
        return False
    ck = checkpoints.resume_checkpoint(cfg, warn=_say)
    if not ck.name.startswith("checkpoint-"):
        raise UsageError(f"--resume: {ck} was not written by this stage's trainer; pick another --out or drop --resume")
    checkpoints.discard_incomplete(cfg.out)
    return True


def _say(*parts: Any) -> None:
    from lifecycle.training import say

    say(*parts)


def train(trainer, cfg: Any, resuming: bool) -> None:
    """`trainer.train`, keeping the promises of every stage (the Trainer's own loop keeps none of them):

    - resume from the newest complete checkpoint (by path: the Trainer alone would take the highest number);
      a checkpoint that does not fit the model or optimizer is refused in one line, not a traceback;
    - Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved and marked, then `Interrupted` (exit 130);
    - a non-finite gradient stops the run before the optimizer applies it (`TrainingDiverged`, exit 3),
      keeping the checkpoints written so far.
    """
    from lifecycle.errors import Interrupted
    from lifecycle.training import GracefulStop

    ck = checkpoints.latest_checkpoint(cfg.out) if resuming else None
    watch = _guard_class()(Path(cfg.out), cfg.mixed_precision == "fp16")
    trainer.add_callback(watch)
    with GracefulStop() as stop:
        watch.stop = stop
        try:
            trainer.train(resume_from_checkpoint=str(ck) if ck is not None else None)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            if ck is None or watch.started or (isinstance(e, OSError) and e.errno is not None):
                raise
            text = " ".join(str(e).split())[:240] or type(e).__name__
            raise UsageError(f"cannot resume from {ck}: it does not fit this model and these options ({text}); "
                             f"resume with the options it was written with, or drop --resume and add --overwrite "
                             f"to start again") from None
        if stop.requested and not watch.acted:
            # The signal came after the last step's checks: save the final step before stopping.
            trainer._save_checkpoint(trainer.model, None)
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    if stop.requested:
        saved = checkpoints.latest_checkpoint(cfg.out)
        raise Interrupted(f"{stop.requested} at step {trainer.state.global_step}: checkpoint saved to {saved}; "
                          f"continue with --resume")


def _guard_class():
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        """Divergence guard and graceful stop for a Trainer (see `train`)."""

        def __init__(self, out: Path, fp16: bool):
            self.out, self.fp16 = out, fp16
            self.stop = None
            self.started = self.acted = False
            self.bad = 0

        def on_step_begin(self, args, state, control, **kw):
            self.started = True  # the checkpoint (if any) has loaded

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            import math

            import torch

            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads:
                return
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()).item()  # one sync per step
            if math.isfinite(norm):
                self.bad = 0
                return
            self.bad += 1
            if self.fp16 and self.bad < 3:
                return  # fp16's loss scaler skips an overflowing step by itself; only a run of them is divergence
            from lifecycle.errors import TrainingDiverged

            last = checkpoints.latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"training diverged at step {state.global_step + 1}: gradient norm {norm} (the update was not "
                f"applied); the last good checkpoint is {last or 'none (no checkpoint was written yet)'}; usual "
                f"cures: lower lr, bf16 instead of fp16, grad_clip 1.0, more warmup_steps; then continue with --resume")

        def on_step_end(self, args, state, control, **kw):
            if self.stop is not None and self.stop.requested:
                control.should_save = True
                control.should_training_stop = True
                self.acted = True

    return _Guard


def set_threads(cfg: Any) -> None:
    """Apply cpu_threads on a machine without CUDA (0 keeps torch's one thread per core)."""
    import torch

    if cfg.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)


def mode_name(cfg: Any) -> str:
    """full | lora | dora | qlora | qdora (QLoRA with DoRA adapters)."""
    if not cfg.use_peft:
        return "full"
    return ("q" if cfg.qlora else "") + ("dora" if cfg.dora else "lora")


def inherit_max_length(cfg: Any, parent: artifacts.Artifact) -> int:
    """The sequence length to fine-tune at: `max_length` if the user set one (> 0), else the
    length the parent was trained at (a pretrain's seq_len, an earlier sft's max_length),
    capped by the model's context, as nanochat's SFT takes the base's sequence length.

    A parent without that record (a hub model, a foreign directory) gives
    min(2048, context). A positive value is returned as given.
    """
    if cfg.max_length > 0:
        return cfg.max_length
    context = None
    if not parent.hub:
        try:
            conf = json.loads((Path(parent.path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            conf = {}
        context = next((conf[k] for k in ("max_position_embeddings", "n_positions", "seq_length")
                        if isinstance(conf.get(k), int) and conf[k] > 0), None)
    recorded = (parent.manifest or {}).get("config") or {}
    trained = next((recorded[k] for k in ("seq_len", "max_length") if isinstance(recorded.get(k), int) and recorded[k] > 0), None)
    length = trained or 2048
    return min(length, context) if context else length


def every_parameter_trains(model_config: dict) -> bool:
    """False for a mixture of experts: a batch may route no token through an expert, whose
    weights then get no gradient (DDP must look for unused parameters); True for dense models."""
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
    return not any(isinstance(model_config.get(k), int) and model_config[k] > 1 for k in keys)


def _base_config(cfg: Any) -> dict | None:
    try:
        return json.loads((Path(cfg.base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return None


# ---------------------------------------------------------------------------
# Trainer arguments
# ---------------------------------------------------------------------------
def trainer_args(cls: type, cfg: Any, *, has_eval: bool, resuming: bool, **extra: Any):
    """A TRL config (trl.SFTConfig or trl.RewardConfig) from our stage config."""
    import torch

    cuda = torch.cuda.is_available()
    base_config = _base_config(cfg)
    if cfg.max_steps > 0 or cfg.epochs <= 0:
        length = {"max_steps": cfg.total_steps}
    else:
        length = {"max_steps": -1, "num_train_epochs": cfg.epochs}
    return cls(
        output_dir=str(checkpoints.checkpoint_root(cfg.out)),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        max_length=cfg.max_length,
        logging_steps=cfg.log_every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_every,
        eval_on_start=has_eval and not resuming,
        save_strategy="steps" if cfg.save_every > 0 else "no",
        save_steps=cfg.save_every if cfg.save_every > 0 else 500,
        save_total_limit=cfg.keep_checkpoints,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cuda,
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        disable_tqdm=True,  # our Progress callback prints one line per log_every steps instead
        dataloader_pin_memory=cuda,
        # DDP's search for parameters without a gradient costs a graph walk per step; only
        # a mixture of experts (or a model whose config we cannot read here) needs it.
        ddp_find_unused_parameters=base_config is None or not every_parameter_trains(base_config),
        **length,
        **extra,
    )


def fp32_adapters_without_autocast(trainer, cfg: Any) -> None:
    """TRL stores QLoRA adapters in bf16, which assumes bf16 autocast; without it
    (mixed_precision "no", as on CPU) a bf16 head meets fp32 activations. Keep
    every trainable tensor in fp32 then."""
    import torch

    if cfg.qlora and cfg.mixed_precision == "no":
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()


def drop_eval(trainer) -> None:
    """Train without evaluation (the held-out split turned out empty after the trainer's preprocessing)."""
    trainer.eval_dataset = None
    trainer.args.eval_strategy = "no"
    trainer.args.eval_on_start = False


def attach_progress(trainer, cfg: Any = None) -> None:
    """Swap the Trainer's raw log printing for our one-line progress report; send TensorBoard
    events to OUT/tb/<stage> as every stage does; with `cfg`, record the recipe in each checkpoint."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_class()())
    out = Path(trainer.args.output_dir).parent
    stage = type(trainer.args).__name__.removesuffix("Config").lower() or "trainer"  # trl.SFTConfig -> sft
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is None:
            cb.logging_dir = str(tensorboard_dir(out) / stage)
    # The completion marker (with the recipe, when `cfg` is given) after every save of the Trainer.
    trainer.add_callback(_fingerprint_class()(cfg))
    from lifecycle import sweep

    if sweep.active():  # `llm sweep` only: periodic held-out metrics go to the trial's pruner
        trainer.add_callback(_sweep_report_class()())


def _fingerprint_class():
    from transformers import TrainerCallback

    class _Fingerprint(TrainerCallback):
        """Marks each checkpoint the Trainer has just saved complete (fsynced), recording the recipe
        (checked on resume): lifecycle/checkpoints.py's completion rule for the Trainer's checkpoints."""

        def __init__(self, cfg):
            self.cfg = cfg

        def on_save(self, args, state, control, **kw):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ck.is_dir():
                checkpoints.write_fingerprint(ck, self.cfg)

    return _Fingerprint


def _sweep_report_class():
    from transformers import TrainerCallback

    class _SweepReport(TrainerCallback):
        """Hands each periodic evaluation's metrics to `sweep.report_eval`, at the start of the next step:
        by then every callback has added its own (sft's gold accuracy) to the log history."""

        pending: int | None = None

        def on_evaluate(self, args, state, control, **kw):
            self.pending = state.global_step

        def on_step_begin(self, args, state, control, **kw):
            from lifecycle import sweep

            step, self.pending = self.pending, None
            if step:
                metrics = {k: v for e in state.log_history if e.get("step") == step for k, v in e.items()}
                sweep.report_eval(step, state.max_steps, metrics)

    return _SweepReport


def _progress_class():
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """`step 120/600  loss 0.41  acc 0.78  lr 4.1e-04  | 35s, eta 1m52s`, and eval lines."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.perf_counter(), state.global_step
            if state.global_step and state.is_world_process_zero:
                print(f"resumed at step {state.global_step}/{state.max_steps}", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            step, total = state.global_step, state.max_steps
            elapsed = time.perf_counter() - self.t0
            done = max(step - self.step0, 1)
            eta = elapsed / done * (total - step)
            if "loss" in logs:
                parts = [f"loss {logs['loss']:.4f}"]
                if "accuracy" in logs:
                    parts.append(f"acc {logs['accuracy']:.3f}")
                parts.append(f"lr {logs.get('learning_rate', 0):.2e}")
            else:
                parts = [f"{k} {logs[k]:.4f}" for k in ("eval_loss", "eval_accuracy", "eval_margin") if k in logs]
            if not parts:
                return
            print(f"step {step:>5}/{total}  " + "  ".join(parts) + f"  | {elapsed:.0f}s, eta {format_eta(eta)}", flush=True)

    return _Progress


# ---------------------------------------------------------------------------
# Logs and artifacts
# ---------------------------------------------------------------------------
_RENAME = {"learning_rate": "lr", "accuracy": "train_accuracy", "margin": "train_margin"}


def final_eval(trainer) -> dict:
    """Held-out metrics at the last step: from the log if the trainer just evaluated there, else evaluate now."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return entry
    return trainer.evaluate()


def write_log(out: str | Path, history: list[dict]) -> Path:
    """OUT/log.jsonl: one JSON object per trainer log entry, each with "step" (the curves `llm run` plots)."""
    lines = []
    for entry in history:
        if "step" not in entry or not any(k in entry for k in ("loss", "eval_loss", "eval_accuracy", "gold_accuracy")):
            continue
        row = {"step": entry["step"]}
        row.update({_RENAME.get(k, k): v for k, v in entry.items() if k != "step"})
        lines.append(json.dumps(row))
    path = Path(out) / "log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def final_model(trained, cfg: Any, base_path: str, head: str, pad_token_id: int | None, scratch: Path):
    """The model the artifact will hold: the trained one (full fine-tuning), else
    the adapter (saved to `scratch`) merged into a fresh full-precision copy of the base.
    With --no-merge the trained peft model itself."""
    from lifecycle.modeling import merge_adapter

    if not cfg.use_peft or not cfg.merge:
        return trained
    trained.save_pretrained(scratch)
    return merge_adapter(base_path, str(scratch), head=head, pad_token_id=pad_token_id)


def save(model, trained, tokenizer, cfg: Any, *, stage: str, metrics: dict, parent: dict, extra: dict | None = None) -> Path:
    """Write OUT atomically (manifest last): the full model unless --no-merge, OUT/adapter with
    adapters, the tokenizer (readable by transformers 4.x and 5.x), the resolved config."""
    from lifecycle.config import to_dict
    from lifecycle.tokenizer import save_tokenizer

    out = Path(cfg.out)
    staging = artifacts.staging_dir(out)
    with quiet_saving():
        if not (cfg.use_peft and not cfg.merge):
            model.save_pretrained(staging, safe_serialization=True)
        if cfg.use_peft:
            trained.save_pretrained(staging / "adapter")
    save_tokenizer(tokenizer, staging)
    return artifacts.publish(staging, out, stage=stage, config=to_dict(cfg), metrics=metrics, parent=parent,
                             seed=cfg.seed, extra=extra)
