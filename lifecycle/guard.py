"""The rules every training stage applies to its --out, before it writes anything and when it stops.

Before: `check_out` refuses, in one line each,
  - an --out that is one of the run's input artifacts, or inside one (the run would
    overwrite what it reads);
  - an --out that cannot be written (a read-only filesystem, a path under a file, /proc),
    found by creating and removing an empty directory in its nearest existing parent;
  - a fresh run into an --out that holds another run's checkpoints (a later --resume
    would continue the older run under the new run's options): --resume continues it,
    --overwrite replaces it;
  - an --out locked by a live run (OUT/.lock, held with flock, so a killed run's lock is
    free at once).

During and after: `claim` holds the lock for the run and leaves --out as the run found
it when the run is refused (a UsageError): everything new is removed, and with
--overwrite the older run's checkpoints and log, set aside at the start, come back. A
full disk or a read-only filesystem met mid-run becomes one line naming the checkpoint
to resume from. A run stopped any other way (Ctrl-C, divergence, a crash) keeps its
checkpoints and loses only its own staging directories.

No torch import at module top.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lifecycle import checkpoints
from lifecycle.artifacts import looks_like_hub_id
from lifecycle.errors import UsageError

LOCK = ".lock"
# A stage config's input artifacts: field -> its flag.
INPUT_FLAGS = {"base": "--base", "init_from": "--init-from", "policy": "--policy", "reward": "--reward",
               "critic": "--critic"}
# What a run writes beside the artifact itself, set aside by --overwrite until the new run gets going.
RUN_STATE = (checkpoints.ROOT, "log.jsonl", "tb")
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the filesystem is read-only"}


def _main_process() -> bool:
    """Rank 0 (or a single process): the one that owns --out. Read from the launcher's environment."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def inputs(cfg: Any) -> list[tuple[str, Path]]:
    """(flag, local path) of every input artifact of a stage config (hub ids and roles such as critic=reward skipped)."""
    found = []
    for name, flag in INPUT_FLAGS.items():
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value or value in ("reward", "policy") or looks_like_hub_id(value):
            continue
        if name == "base" and type(cfg).__name__ == "GRPOConfig":
            flag = "--policy"
        found.append((flag, Path(value).expanduser()))
    return found


def _existing_parent(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _lock_holder(out: Path) -> int | None:
    """The pid of a live process holding OUT/.lock, else None (a stale file from a killed run is free)."""
    import fcntl

    path = out / LOCK
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return int(path.read_text().strip() or 0) or -1
        except (OSError, ValueError):
            return -1
    finally:
        os.close(fd)
    return None


def check_out(cfg: Any) -> None:
    """The checks on --out that need no weights; raises UsageError, writes nothing."""
    out = Path(cfg.out).expanduser()
    resolved = out.resolve()
    for flag, path in inputs(cfg):
        if not path.exists():
            continue  # the stage's own input check names it
        src = path.resolve()
        if resolved == src or src in resolved.parents:
            where = "is" if resolved == src else "is inside"
            raise UsageError(f"--out {cfg.out} {where} the input {flag} {path}: the run would overwrite what it reads; "
                             f"pick another --out")
        if resolved in src.parents:
            raise UsageError(f"the input {flag} {path} is inside --out {cfg.out}, where the run prunes and replaces "
                             f"files; copy it elsewhere or pick another --out")
    probe = _existing_parent(out)
    if not probe.is_dir():
        raise UsageError(f"--out {cfg.out} cannot be created: {probe} is a file; pick another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
    except OSError as e:
        raise UsageError(f"--out {cfg.out} is not writable ({e.strerror or e} at {probe}); pick another --out") from None
    overwrite = getattr(cfg, "overwrite", False)
    if cfg.resume and overwrite:
        raise UsageError("--resume and --overwrite both given; --resume continues the run in --out, --overwrite "
                         "replaces it: pick one")
    if not cfg.resume and not overwrite:
        found = checkpoints._named(out)
        if found:
            shown = ", ".join(d.name for d in found[-3:])
            raise UsageError(f"--out {cfg.out} holds another run's checkpoints ({shown}); continue that run with "
                             f"--resume, replace it with --overwrite, or pick another --out")
    holder = _lock_holder(out) if _main_process() else None  # the other ranks run beside rank 0, which holds it
    if holder is not None and holder != os.getpid():
        who = f"process {holder}" if holder > 0 else "another process"
        raise UsageError(f"--out {cfg.out} is in use by a running {who} (it holds {out / LOCK}); wait for it to "
                         f"finish or pick another --out")


def check_disk(cfg: Any, source: Any) -> None:
    """Free space for keep_checkpoints + 1 checkpoints and the artifact (full training); the artifact only
    (adapters: their checkpoints are small). `source` is the input Artifact the model is built from
    (its parameters are counted from the safetensors headers; a hub id is not checked)."""
    from lifecycle import training

    if getattr(source, "hub", False):
        return
    n_params = parameters_in(getattr(source, "path", source))
    if not n_params:
        return
    if getattr(cfg, "use_peft", False):
        training.check_disk(cfg.out, n_params, 0, bytes_per_param=0)
    else:
        training.check_disk(cfg.out, n_params, cfg.keep_checkpoints)


def check_update(where: str, norms: dict[str, float], out: str | Path) -> None:
    """The divergence guard for a loop of ours with several gradient norms (ppo's actor and critic): stop before
    the optimizer applies a non-finite update, naming where and the last good checkpoint (exit 3)."""
    import math

    bad = {k: v for k, v in norms.items() if not math.isfinite(v)}
    if not bad:
        return
    from lifecycle.errors import TrainingDiverged

    last = checkpoints.latest_checkpoint(out)
    shown = ", ".join(f"{k} {v}" for k, v in bad.items())
    raise TrainingDiverged(
        f"training diverged at {where}: {shown} (the update was not applied); the last good checkpoint is "
        f"{last or 'none (no checkpoint was written yet)'}; usual cures: lower lr, bf16 instead of fp16, "
        f"grad_clip 1.0, more warmup_steps, a reward model whose scores are finite; then continue with --resume")


def context_of(source: Any) -> int | None:
    """The model's context in positions, from its config.json (None for a hub id or a config without one)."""
    if getattr(source, "hub", False):
        return None
    try:
        conf = json.loads((Path(getattr(source, "path", source)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(conf, dict):
        return None
    conf = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else conf
    return next((conf[k] for k in ("max_position_embeddings", "n_positions") if isinstance(conf.get(k), int)), None)


def check_context(source: Any, tokens: int, what: str, fix: str) -> None:
    """Refuse sequences longer than the model's context: positions past it are either an index error
    deep in the model or (rotary embeddings) silently out of the range the model was trained on."""
    context = context_of(source)
    if context and tokens > context:
        raise UsageError(f"{what} ({tokens} tokens) exceeds the model's context of {context} positions; {fix}")


def before_loading(cfg: Any, info: Any, stage: str, **estimate_kw: Any) -> None:
    """The checks a stage makes on its input before loading any weights: the memory estimate (refusing a run
    that will not fit the GPU), free disk for its checkpoints and artifact, and the LoRA target names."""
    from lifecycle import training

    training.check_memory(cfg, info, stage, **estimate_kw)
    check_disk(cfg, info)
    check_lora_targets(cfg, info)


def check_lora_targets(cfg: Any, source: Any) -> None:
    """Every name in lora_target_modules must name modules of the model (read from its safetensors headers);
    peft would otherwise stop with a traceback after the weights have loaded."""
    from lifecycle.artifacts import _header

    targets = [t.strip() for t in str(getattr(cfg, "lora_target_modules", "all-linear")).split(",") if t.strip()]
    if not getattr(cfg, "use_peft", False) or targets == ["all-linear"] or getattr(source, "hub", False):
        return
    names: set[str] = set()
    for f in sorted(Path(getattr(source, "path", source)).glob("*.safetensors")):
        for key in _header(f):
            names.update(key.split("."))
    if not names:
        return
    unknown = [t for t in targets if t not in names]
    if unknown:
        linear = sorted(n for n in names if n.endswith(("_proj", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "dense")))
        raise UsageError(f"lora_target_modules names {', '.join(unknown)}, which the model in {getattr(source, 'path', source)} "
                         f"does not have; use 'all-linear' or some of: {', '.join(linear[:12]) or 'its linear layers'}")


def verify(cfg: Any, *sources: Any) -> None:
    """With --verify, every input artifact's files against the sha256 its manifest records (for the stages
    whose inputs were checked without it)."""
    from lifecycle.artifacts import CAUSAL_LM, check_artifact

    if not getattr(cfg, "verify", False):
        return
    for flag, art in zip(("--policy", "--reward", "--critic"), sources):
        if art is not None and not art.hub:
            check_artifact(art.path, art.kind or CAUSAL_LM, flag, verify=True)


def parameters_in(path: str | Path) -> int | None:
    """Parameters stored in an artifact's safetensors files, read from their headers (no weights loaded)."""
    total = 0
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n).decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                count = 1
                for d in v.get("shape", []):
                    count *= int(d)
                total += count
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _own_scratch(out: Path) -> list[Path]:
    """This process's staging and scratch directories in OUT."""
    pid = os.getpid()
    return [p for p in (out / f".staging-{pid}", out / f".adapter-{pid}") if p.exists()]


@contextlib.contextmanager
def claim(cfg: Any) -> Iterator[None]:
    """Check --out, lock it for this run, and on the way out leave it as described in the module docstring."""
    check_out(cfg)
    if not _main_process():
        yield
        return
    import fcntl

    out = Path(cfg.out).expanduser()
    created: list[Path] = []
    probe = out.absolute()
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    before = set(os.listdir(out)) if out.is_dir() else set()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        if LOCK not in before:
            _remove(out / LOCK)
        raise UsageError(f"--out {cfg.out} is in use by another running process (it holds {out / LOCK}); "
                         f"wait for it to finish or pick another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    aside = None
    if getattr(cfg, "overwrite", False) and not cfg.resume:
        aside = out / f".replaced-{os.getpid()}"
        moved = [name for name in RUN_STATE if (out / name).exists()]
        if moved:
            aside.mkdir()
            for name in moved:
                os.replace(out / name, aside / name)
        else:
            aside = None
    try:
        yield
    except UsageError:
        _undo(out, before | {LOCK}, aside)
        aside = None
        raise
    except Exception as e:
        code = _disk_error(e)
        if code is None:
            for p in _own_scratch(out):
                _remove(p)
            raise
        for p in _own_scratch(out):
            _remove(p)
        ck = checkpoints.latest_checkpoint(out)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        resume = f"the last complete checkpoint is {ck}: free space and continue with --resume" if ck else \
            "no checkpoint was written: free space and run again"
        raise UsageError(f"{DISK_ERRORS[code]} while writing{where}; {resume}") from None
    except BaseException:
        for p in _own_scratch(out):
            _remove(p)
        raise
    finally:
        if aside is not None:
            _remove(aside)
        _remove(out / LOCK)  # while still held: a stale file from a killed run goes too
        os.close(fd)
        for d in created:  # innermost first: directories this run made and left empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _disk_error(e: BaseException) -> int | None:
    """The errno of a full disk or read-only filesystem behind `e`, or None. torch.save and safetensors
    report a failed write as a RuntimeError carrying the system's message, so the text is read too."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return e.errno
        text = str(e)
        for code in DISK_ERRORS:
            if os.strerror(code) in text:
                return code
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _undo(out: Path, before: set[str], aside: Path | None) -> None:
    """A refused run: remove what it added to OUT and bring back what --overwrite set aside."""
    for name in sorted(set(os.listdir(out)) - before):
        path = out / name
        if name == checkpoints.ROOT and checkpoints.list_checkpoints(out):
            continue  # checkpoints written by this run before the refusal stay resumable
        if name.startswith(".replaced-"):
            continue
        _remove(path)
    if aside is not None and aside.is_dir():
        for item in aside.iterdir():
            dest = out / item.name
            if dest.exists():
                _remove(dest)
            os.replace(item, dest)
        _remove(aside)
