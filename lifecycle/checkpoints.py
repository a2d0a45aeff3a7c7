"""One checkpoint vocabulary for every stage: where checkpoints live, which are
complete, which is the newest, and whether a resume runs the same recipe.

Every stage keeps its checkpoints in OUT/checkpoints/. Two writers put them there:

  step-000200/         our own loops (pretrain, ppo): Accelerate's save_state plus
                       state.json, written last into a temporary directory that is
                       then renamed into place (so a kill leaves the old one or the new one)
  checkpoint-200/      the transformers Trainer (sft, reward, through TRL): its files
                       plus trainer_state.json, which it writes last, in place

A checkpoint is complete when its marker parses as JSON: state.json for ours; for the
Trainer's, fingerprint.json, which our callback writes (fsynced, after fsyncing every
file the Trainer wrote) once the Trainer's save returns. A Trainer checkpoint without
our marker counts as complete by its own last file (trainer_state.json) only where no
sibling carries the marker (a directory written without our callback); beside marked
siblings it was cut short. Anything else (a temporary directory, a directory a kill
cut short) is not a checkpoint. Discovery knows both names, so `llm run` and
`--resume` find the newest complete checkpoint of any stage, and a resume falls back
past a damaged newer one with a warning.

A checkpoint records the recipe it was written under (its fingerprint: the stage and
the resolved config, seed included, without the options that may change between a
run and its resume, such as log_every or save_every). Resuming under a different recipe would silently train
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
    "overwrite", "verify",
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


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def _marked_siblings(ck: Path) -> bool:
    """Whether any Trainer checkpoint beside `ck` carries our marker (then every one of them should)."""
    return any((d / FINGERPRINT).exists() for d in ck.parent.glob("checkpoint-*") if d != ck)


def is_complete_checkpoint(ck: str | Path) -> bool:
    """Its writer got to the end: the marker file exists and parses as JSON (see the module docstring)."""
    ck = Path(ck)
    if not ck.is_dir() or checkpoint_step(ck) is None:
        return False
    if not _parses(_marker(ck)):
        return False
    if ck.name.startswith("checkpoint-"):
        if (ck / FINGERPRINT).exists():
            return _parses(ck / FINGERPRINT)
        return not _marked_siblings(ck)
    return True


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


def incomplete_checkpoints(out: str | Path) -> list[Path]:
    """Step directories a kill cut short (no parseable marker), oldest first."""
    return [d for d in _named(out) if not is_complete_checkpoint(d)]


def require_checkpoint(out: str | Path, warn=None) -> Path:
    """The checkpoint `--resume` continues from; UsageError if there is none.

    A damaged checkpoint newer than it is named through `warn` (a print function),
    so the fall-back is never silent.
    """
    ck = latest_checkpoint(out)
    if ck is None:
        broken = incomplete_checkpoints(out)
        extra = f" (only {', '.join(d.name for d in broken)}, cut short by a kill)" if broken else ""
        raise UsageError(f"--resume given but no checkpoint under {checkpoint_root(out)}{extra}; "
                         f"drop --resume to start a new run")
    newer = [d for d in incomplete_checkpoints(out) if checkpoint_step(d) > checkpoint_step(ck)]
    if newer and warn is not None:
        warn(f"warning: {', '.join(d.name for d in newer)} under {checkpoint_root(out)} "
             f"{'is' if len(newer) == 1 else 'are'} incomplete (a run was stopped while writing); resuming from {ck.name}")
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
def stage_of(cfg: Any) -> str | None:
    """The stage a config belongs to (`sft` for an SFTConfig), None for a config of no stage."""
    from lifecycle.config import STAGE_CONFIGS

    return next((name for name, cls in STAGE_CONFIGS.items() if type(cfg) is cls), None)


def fingerprint(cfg: Any) -> dict:
    """The options of a stage config that decide what is trained (everything but MAY_CHANGE), and its stage."""
    from lifecycle.config import to_dict

    every = to_dict(cfg)
    found = {k: v for k, v in sorted(every.items()) if not _may_change(k)}
    # The options that may change are recorded too, apart, so a resume can say which ones did.
    found[SAFE_KEY] = {k: v for k, v in sorted(every.items()) if _may_change(k) and k not in ("out", "resume")}
    stage = stage_of(cfg)
    return {"stage": stage, **found} if stage else found


SAFE_KEY = "_may_change"  # the fingerprint's record of the options a resume may change (never compared)


def _may_change(k: str) -> bool:
    return k in MAY_CHANGE or k.startswith(MAY_CHANGE_PREFIXES)


def recorded_fingerprint(ck: str | Path) -> dict | None:
    """The fingerprint a checkpoint was written under, or None if it records none (older checkpoints)."""
    ck = Path(ck)
    for path, key in ((ck / STATE, "fingerprint"), (ck / FINGERPRINT, None)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        found = data.get(key) if key else data
        if isinstance(found, dict) and found:
            return found
    return None


RESUME_FIX = "resume with the same options, or drop --resume (or pick another --out) to start a new run"


def check_fingerprint(ck: str | Path, cfg: Any, fix: str = RESUME_FIX) -> None:
    """Refuse to resume `ck` under a recipe other than the one it was written under; `fix` ends the message."""
    old = recorded_fingerprint(ck)
    if old is None:
        return
    new = json.loads(json.dumps(fingerprint(cfg)))  # as it would read back from JSON (tuples -> lists)
    if "stage" in old and old["stage"] != new.get("stage"):
        raise UsageError(f"cannot resume from {ck}: it is a checkpoint of `llm {old['stage']}`, and this is "
                         f"`llm {new.get('stage')}`; pick another --out, or drop --resume and add --overwrite to replace it")
    if "stage" not in old:  # written before checkpoints recorded their stage
        new.pop("stage", None)
    old_safe, new_safe = old.pop(SAFE_KEY, None), new.pop(SAFE_KEY, {})
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
    if diff:
        shown = ", ".join(f"{k}={old.get(k, '<unset>')!r} (now {new.get(k, '<unset>')!r})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UsageError(
            f"cannot resume from {ck}: it was written with {shown}{more}; {fix}"
        )
    changed = [k for k in sorted(set(old_safe or {}) | set(new_safe))
               if old_safe is not None and old_safe.get(k, "<unset>") != new_safe.get(k, "<unset>")]
    if changed and os.environ.get("RANK", "0") == "0":
        print("resuming with changed options that do not change what is trained: "
              + ", ".join(f"{k}={new_safe.get(k, '<unset>')!r} (was {old_safe.get(k, '<unset>')!r})" for k in changed),
              flush=True)


def check_resume_step(ck: str | Path, total: int) -> None:
    """Refuse a resume whose checkpoint is already past the steps this run is to train."""
    step = checkpoint_step(ck)
    if step is not None and step > total:
        raise UsageError(f"cannot resume from {ck}: it is at step {step}, past this run's {total} steps; "
                         f"give --max-steps {step} or more (or drop --resume and add --overwrite to start again)")


def resume_checkpoint(cfg: Any, warn=None) -> Path:
    """The checkpoint `--resume` continues from, checked: it exists (falling back past a damaged newer one,
    named through `warn`), it was written by this stage under this recipe, and it is not past the run's end."""
    ck = require_checkpoint(cfg.out, warn)
    check_fingerprint(ck, cfg)
    check_resume_step(ck, cfg.total_steps)
    return ck


def write_fingerprint(ck: str | Path, cfg: Any) -> None:
    """Mark a Trainer checkpoint complete, recording its recipe: every file the Trainer wrote is fsynced
    first, then the marker (itself fsynced) is written, so a checkpoint with the marker survives a crash."""
    ck = Path(ck)
    for f in sorted(ck.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    atomic_write_json(ck / FINGERPRINT, fingerprint(cfg) if cfg is not None else {})
    _fsync_dir(ck)


def prune(out: str | Path, prefix: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints of one writer (after the newest is marked)."""
    old = list_checkpoints(out, prefix)[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old


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


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:
        pass


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
