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

from lifecycle import artifacts
from lifecycle.errors import UsageError


def say(*parts: Any) -> None:
    """Print on the main process only."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(*parts, flush=True)


def quiet() -> None:
    """Silence library chatter (load/map progress bars, advisory warnings); our progress line stays."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ...": optional kernel
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# ---------------------------------------------------------------------------
# Checkpoints (the Trainer's own: OUT/checkpoints/checkpoint-N)
# ---------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def has_checkpoint(out: str | Path) -> bool:
    root = checkpoint_dir(out)
    return root.is_dir() and any(d.is_dir() and d.name.startswith("checkpoint-") for d in root.iterdir())


def check_resume(cfg: Any) -> bool:
    """True when training should resume; UsageError for --resume without a checkpoint."""
    if cfg.resume and not has_checkpoint(cfg.out):
        raise UsageError(f"--resume given but no checkpoint under {checkpoint_dir(cfg.out)}; drop --resume to start a new run")
    return bool(cfg.resume)


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


def check_memory(cfg: Any, info: artifacts.Artifact, stage: str) -> None:
    """Warn or refuse (unless --force) when the memory estimate exceeds the GPU; silent on CPU or for hub ids."""
    if info.hub:
        return
    from lifecycle import memory

    model_config = json.loads((Path(info.path) / "config.json").read_text(encoding="utf-8"))
    method = "qlora" if cfg.qlora else ("lora" if cfg.lora or cfg.dora else "full")
    dtype = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "fp32")
    memory.check_fits(model_config, stage=stage, method=method, batch_size=cfg.batch_size, seq_len=cfg.max_length,
                      force=cfg.force, dtype=dtype, lora_r=cfg.lora_r,
                      grad_ckpt="full" if cfg.gradient_checkpointing else "none")


def check_tracker(cfg: Any) -> None:
    """--report-to needs its package; say so before any weights are loaded."""
    import importlib.util

    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UsageError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package, which is not installed; "
                         f"pip install 'llm-lifecycle[{cfg.report_to}]' or drop --report-to")


# ---------------------------------------------------------------------------
# Trainer arguments
# ---------------------------------------------------------------------------
def trainer_args(cls: type, cfg: Any, *, has_eval: bool, resuming: bool, **extra: Any):
    """A TRL config (trl.SFTConfig or trl.RewardConfig) from our stage config."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.max_steps > 0 or cfg.epochs <= 0:
        length = {"max_steps": cfg.total_steps}
    else:
        length = {"max_steps": -1, "num_train_epochs": cfg.epochs}
    return cls(
        output_dir=str(checkpoint_dir(cfg.out)),
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


def attach_progress(trainer) -> None:
    """Swap the Trainer's raw log printing for our one-line progress report."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_class()())


def _eta(seconds: float) -> str:
    m, s = divmod(max(0, int(seconds)), 60)
    return f"{m}m{s:02d}s"


def _progress_class():
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """`step 120/600  loss 0.41  acc 0.78  lr 4.1e-04  | 35s, eta 1m52s`, and eval lines."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.perf_counter(), state.global_step

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
            print(f"step {step:>5}/{total}  " + "  ".join(parts) + f"  | {elapsed:.0f}s, eta {_eta(eta)}", flush=True)

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
    """Write OUT atomically (manifest last): full weights and/or OUT/adapter, tokenizer, resolved config."""
    from lifecycle.config import to_dict

    out = Path(cfg.out)
    config = to_dict(cfg)
    if cfg.use_peft and not cfg.merge:
        staging = artifacts.staging_dir(out)
        tokenizer.save_pretrained(staging)
        trained.save_pretrained(staging / "adapter")
        return artifacts.publish(staging, out, stage=stage, config=config, metrics=metrics, parent=parent,
                                 seed=cfg.seed, extra=extra)
    extra_dirs = {"adapter": lambda d: trained.save_pretrained(d)} if cfg.use_peft else None
    return artifacts.save_model_artifact(model, tokenizer, out, stage=stage, config=config, metrics=metrics,
                                         parent=parent, seed=cfg.seed, extra_dirs=extra_dirs, extra=extra)
