"""One checkpoint vocabulary for every stage: where checkpoints live, which are
complete, which is the newest, and whether a resume runs the same recipe.

Every stage keeps its checkpoints in OUT/checkpoints/. Two writers put them there:

  step-000200/         our own loops (pretrain, ppo): Accelerate's save_state plus
                       state.json, written last into a temporary directory that is
                       then renamed into place (so a kill leaves the old one or the new one)
  checkpoint-200/      the transformers Trainer (sft, reward, through TRL): its files
                       plus trainer_state.json, which it writes last, in place

A checkpoint is complete when its marker (state.json, trainer_state.json) parses as
JSON; anything else (a temporary directory, a directory a kill cut short) is not a
checkpoint. Discovery knows both names, so `llm run` and `--resume` find the newest
complete checkpoint of any stage.

A checkpoint records the recipe it was written under (its fingerprint: the resolved
config without the options that may change between a run and its resume, such as
log_every or save_every). Resuming under a different recipe would silently train
something neither run asked for, so it is refused with the options that differ.

This module imports no torch at module level.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lifecycle.artifacts import atomic_write_json, quiet_saving
from lifecycle.errors import UsageError

ROOT = "checkpoints"
STATE = "state.json"                  # our loops' marker (and their JSON state)
TRAINER_STATE = "trainer_state.json"  # the Trainer's marker
FINGERPRINT = "fingerprint.json"      # the recipe a Trainer checkpoint was written under
# checkpoint name prefix -> the file written last, whose presence marks it complete
MARKERS = {"step-": STATE, "checkpoint-": TRAINER_STATE}
# Options that may change between a run and its resume without changing what is trained.
MAY_CHANGE = {
    "out", "resume", "force", "report_to", "log_every", "save_every", "keep_checkpoints", "cpu_threads",
    "eval_every", "eval_batches", "eval_batch_size", "sample_prompt", "compile", "explain", "debug_digest",
    "strict", "stop_on_collapse",
    "max_steps",  # training longer (or shorter) than first planned is still the same run
}
MAY_CHANGE_PREFIXES = ("watch_", "gate_")


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------
def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / ROOT


def checkpoint_step(ck: str | Path) -> int | None:
    """The optimizer step of a checkpoint directory name (step-000200, checkpoint-200), else None."""
    name = Path(ck).name
    for prefix in MARKERS:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None


def _marker(ck: Path) -> Path:
    return ck / next(m for p, m in MARKERS.items() if ck.name.startswith(p))


def is_complete_checkpoint(ck: str | Path) -> bool:
    """Its writer got to the end: the marker file exists and parses as JSON."""
    ck = Path(ck)
    if not ck.is_dir() or checkpoint_step(ck) is None:
        return False
    try:
        json.loads(_marker(ck).read_text(encoding="utf-8"))
        return True
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def _named(out: str | Path, prefix: str | None = None) -> list[Path]:
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None
             and (prefix is None or d.name.startswith(prefix))]
    return sorted(found, key=checkpoint_step)


def list_checkpoints(out: str | Path, prefix: str | None = None) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (`prefix` keeps one writer's: "step-", "checkpoint-")."""
    return [d for d in _named(out, prefix) if is_complete_checkpoint(d)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of either writer; a damaged newest one falls back to the one before."""
    cks = list_checkpoints(out)
    return cks[-1] if cks else None


def require_checkpoint(out: str | Path) -> Path:
    """The checkpoint `--resume` continues from; UsageError if there is none."""
    ck = latest_checkpoint(out)
    if ck is None:
        raise UsageError(f"--resume given but no checkpoint under {checkpoint_root(out)}; drop --resume to start a new run")
    return ck


def discard_incomplete(out: str | Path) -> list[Path]:
    """Delete the checkpoints a kill cut short (and leftover temporaries); returns what was removed.

    The Trainer resumes from the highest-numbered `checkpoint-N` whether or not it is
    complete; after this, its choice and `latest_checkpoint` agree.
    """
    root = checkpoint_root(out)
    gone = [d for d in _named(out) if not is_complete_checkpoint(d)]
    if root.is_dir():
        gone += sorted(root.glob(".tmp-step-*"))
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


# ---------------------------------------------------------------------------
# Fingerprint: the recipe a checkpoint belongs to
# ---------------------------------------------------------------------------
def fingerprint(cfg: Any) -> dict:
    """The options of a stage config that decide what is trained (everything but MAY_CHANGE)."""
    from lifecycle.config import to_dict

    return {k: v for k, v in sorted(to_dict(cfg).items())
            if k not in MAY_CHANGE and not k.startswith(MAY_CHANGE_PREFIXES)}


def recorded_fingerprint(ck: str | Path) -> dict | None:
    """The fingerprint a checkpoint was written under, or None if it records none (older checkpoints)."""
    ck = Path(ck)
    for path, key in ((ck / STATE, "fingerprint"), (ck / FINGERPRINT, None)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        found = data.get(key) if key else data
        if isinstance(found, dict):
            return found
    return None


RESUME_FIX = "resume with the same options, or drop --resume (or pick another --out) to start a new run"


def check_fingerprint(ck: str | Path, cfg: Any, fix: str = RESUME_FIX) -> None:
    """Refuse to resume `ck` under a recipe other than the one it was written under; `fix` ends the message."""
    old = recorded_fingerprint(ck)
    if old is None:
        return
    new = json.loads(json.dumps(fingerprint(cfg)))  # as it would read back from JSON (tuples -> lists)
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
    if diff:
        shown = ", ".join(f"{k}={old.get(k, '<unset>')!r} (now {new.get(k, '<unset>')!r})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UsageError(
            f"cannot resume from {ck}: it was written with {shown}{more}; {fix}"
        )


def write_fingerprint(ck: str | Path, cfg: Any) -> None:
    """Record the recipe in a checkpoint whose writer keeps no state of ours (the Trainer's)."""
    atomic_write_json(Path(ck) / FINGERPRINT, fingerprint(cfg))


# ---------------------------------------------------------------------------
# Our loops' checkpoints (pretrain, ppo)
# ---------------------------------------------------------------------------
def save_checkpoint(accelerator, out: str | Path, step: int, state: dict, keep: int, extra_files: dict | None = None) -> Path:
    """Save model/optimizer/RNG (Accelerate's save_state) plus our JSON state, atomically.

    All processes call this (Accelerate saves each rank's RNG); the main process
    renames the finished directory into place and prunes old checkpoints.
    """

    root = checkpoint_root(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with quiet_saving():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_write_json(tmp / STATE, {"step": step, **state})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(out, "step-")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        # Leftover temporaries from killed runs.
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ck: Path) -> dict:
    """Restore model/optimizer/RNG from `ck` (safetensors + weights_only loads) and return our JSON state."""
    accelerator.load_state(str(ck))
    return json.loads((ck / STATE).read_text(encoding="utf-8"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
