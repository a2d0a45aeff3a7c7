"""The artifact directory every stage writes and the next stage reads.

An artifact is a standard Hugging Face model directory (config.json,
model.safetensors, tokenizer files, generation_config.json) plus
`lifecycle.json`, the manifest:

    {"stage", "kind", "parent": {"path", "digest", "stage"} | null, "config",
     "metrics", "created", "versions", "seed", "files": {name: bytes},
     "checksums": {name: sha256}}

Writing is crash-safe: files are saved into a staging directory, the old
manifest is removed, each file is moved into place with an atomic rename, and
the manifest is written last (also by rename). A directory is a valid artifact
only when its manifest exists and every file it lists has the recorded size,
so a run killed mid-write leaves a directory that is refused, never one that
is read half-written. While files move in, OUT/.publishing marks the directory
as ours and unfinished, so even without a manifest it is never taken for a
foreign model directory. The next stage checks sizes always and the sha256 of
every file with --verify (`check_artifact(..., verify=True)`).

No torch import at module top.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lifecycle.errors import UsageError

MANIFEST = "lifecycle.json"
CAUSAL_LM = "causal-lm"
REWARD_MODEL = "reward-model"
STAGE_KIND = {"pretrain": CAUSAL_LM, "sft": CAUSAL_LM, "ppo": CAUSAL_LM, "reward": REWARD_MODEL,
              "dpo": CAUSAL_LM, "grpo": CAUSAL_LM}
PUBLISHING = ".publishing"  # present while `publish` moves files in; removed once the manifest is written
# The command that creates each kind, for error messages.
MAKES = {CAUSAL_LM: "llm pretrain --out DIR (or llm sft)", REWARD_MODEL: "llm reward --base DIR --out DIR"}
# What each input flag takes, whatever kind a caller probes it for (so a missing --policy is never
# suggested to be made with `llm reward` while a caller checks whether the two were swapped).
FLAG_KIND = {"--base": CAUSAL_LM, "--policy": CAUSAL_LM, "--model": CAUSAL_LM, "--init-from": CAUSAL_LM,
             "--reward": REWARD_MODEL}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


# ---------------------------------------------------------------------------
# Small atomic-write helpers
# ---------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path via a temporary file and rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def artifact_digest(path: Path) -> str:
    """sha256 over the weight and config files: identifies the exact parent a stage started from."""
    path = Path(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = path / name
        if p.is_file() and (name.endswith(".safetensors") or name in ("config.json", "adapter_config.json")):
            h.update(name.encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the stack, recorded in every manifest so a run can be repeated."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("llm-lifecycle", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------
def read_manifest(path: str | Path, *, strict: bool = False) -> dict | None:
    """The manifest of an artifact directory, None if it has none; UsageError if it is not a JSON object,
    or (`strict`, as for an input artifact) lacks what a stage reads: a stage, a files table of sizes."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{p} is corrupted (not valid JSON); re-run the stage that wrote {path}") from None
    why = manifest_problem(m) if strict or not isinstance(m, dict) else None
    if why:
        raise UsageError(f"{p} is malformed ({why}); re-run the stage that wrote {path}")
    return m


def manifest_problem(m: Any) -> str | None:
    """What makes a parsed lifecycle.json unusable, or None: the fields the stages and `llm run` read."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if not isinstance(m.get("stage"), str) or not m["stage"]:
        return "no stage"
    files = m.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in files.items()):
        return "files is not a mapping of file name to size"
    if any(Path(k).is_absolute() or ".." in Path(k).parts for k in files):
        return "files names a path outside the directory"
    for key in ("config", "metrics", "checksums"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            return f"{key} is not a mapping"
    if m.get("kind") is not None and m["kind"] not in (CAUSAL_LM, REWARD_MODEL):
        return f"kind {m['kind']!r} is neither {CAUSAL_LM} nor {REWARD_MODEL}"
    return None


# Files this process has hashed and found intact, keyed by (path, size, mtime): `llm run` hands a parent to
# several stages (sft's output to reward and ppo), and each --verify would read the same gigabytes again.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_checksums(path: str | Path, manifest: dict) -> str | None:
    """The first file whose sha256 differs from the manifest's record, as a reason; None when all agree.
    A file already verified in this process and unchanged since (same size and modification time) is not read again."""
    for name, digest in sorted((manifest.get("checksums") or {}).items()):
        f = Path(path) / name
        if not f.is_file():
            return f"{name}'s content does not match its checksum in {MANIFEST} (changed or corrupted)"
        st = f.stat()
        key = (f"{f.resolve()}:{digest}", st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            continue
        if file_digest(f) != digest:
            return f"{name}'s content does not match its checksum in {MANIFEST} (changed or corrupted)"
        _VERIFIED.add(key)
    return None


def is_complete(path: str | Path) -> bool:
    """True when path holds a finished artifact: manifest present and every listed file at its recorded size."""
    path = Path(path)
    try:
        m = read_manifest(path, strict=True)
    except UsageError:
        return False
    if not m:
        return False
    for name, size in (m.get("files") or {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def _kind_from_config(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        return None
    archs = [a for a in archs if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return REWARD_MODEL
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    return None


def looks_like_hub_id(s: str) -> bool:
    """`org/name` with no local meaning: a Hugging Face Hub id (used as is for users who are online)."""
    return (
        s.count("/") == 1
        and not s.startswith((".", "/", "~"))
        and not Path(s).exists()
        and all(part and not part.startswith(".") for part in s.split("/"))
    )


def check_safetensors(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, corrupted header), or None if its header is sound.

    Reads only the header: an 8-byte little-endian length, a JSON table of
    tensors with their byte ranges, then the data, which must be long enough.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size or n > 100_000_000:
                return "its header length is impossible (truncated or not a safetensors file)"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON (corrupted)"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        return f"it is truncated ({size} bytes, the header promises {8 + n + end})"
    return None


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h = json.loads(f.read(n).decode("utf-8"))
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _tokenizer_size(path: Path) -> int | None:
    """Tokens in a fast tokenizer's tokenizer.json (its vocabulary plus added tokens), None without one."""
    try:
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids.update(t["id"] for t in tok.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int))
        return max(ids) + 1 if ids else None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
        return None


def config_mismatch(path: Path) -> str | None:
    """Whether config.json describes the weights beside it: the vocabulary against the embedding's rows.

    transformers would otherwise stop with a shape-mismatch traceback, or (a smaller
    vocabulary in the weights of a resized model) index past the embedding later.
    """
    try:
        conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "config.json is not valid JSON"
    if not isinstance(conf, dict):
        return "config.json is not a JSON object"
    conf = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else conf
    vocab = conf.get("vocab_size")
    tokens = _tokenizer_size(path)
    if isinstance(vocab, int) and tokens and tokens > vocab:
        return (f"its tokenizer has {tokens} tokens but config.json says vocab_size={vocab} (ids past the "
                f"embedding would fail mid-run)")
    for w in sorted(path.glob("*.safetensors")):
        for name, t in _header(w).items():
            if name.endswith(EMBEDDINGS) and isinstance(t, dict) and isinstance(t.get("shape"), list) and t["shape"]:
                if isinstance(vocab, int) and t["shape"][0] != vocab:
                    return (f"config.json says vocab_size={vocab} but {w.name}'s {name} has {t['shape'][0]} rows "
                            f"(the config belongs to another model)")
                return None
    return None


@dataclass(frozen=True)
class Artifact:
    """A checked input artifact: what one stage hands the next."""

    path: str                   # the directory (resolved), or a hub id
    kind: str                   # CAUSAL_LM or REWARD_MODEL
    manifest: dict | None       # its lifecycle.json, None for a hub id or a foreign directory
    hub: bool = False           # a Hugging Face Hub id, used as is

    @property
    def stage(self) -> str | None:
        return (self.manifest or {}).get("stage")


def check_artifact(path: str, expect: str, flag: str, *, verify: bool = False) -> Artifact:
    """Check that `path` is a usable artifact of kind `expect` before loading any weights.

    Raises UsageError naming what was found, what was expected, and the command
    that makes it. With `verify`, every file's sha256 is compared with the manifest's.
    """
    if looks_like_hub_id(path):
        return Artifact(path=path, kind=expect, manifest=None, hub=True)
    p = Path(path).expanduser()
    if not p.exists():
        makes = MAKES[FLAG_KIND.get(flag, expect)]
        raise UsageError(f"{flag} {path} does not exist; create it with `{makes}` or pass a Hugging Face model id")
    if not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a model directory; pass the directory written by `{MAKES[expect]}`")
    present = sorted(os.listdir(p))
    manifest = None
    if not (p / MANIFEST).exists() and ((p / PUBLISHING).exists() or any(n.startswith(".staging-") for n in present)):
        raise UsageError(f"{flag} {path} is unfinished: the run writing it stopped before its {MANIFEST} was written; "
                         f"re-run (or --resume) the stage that writes it")
    if (p / MANIFEST).exists():
        manifest = read_manifest(p, strict=True)
        if not is_complete(p):
            raise UsageError(
                f"{flag} {path} is incomplete or corrupted (a file listed in {MANIFEST} is missing or has the wrong size); "
                f"re-run the stage that writes it"
            )
    if not (p / "config.json").is_file():
        raise UsageError(
            f"{flag} {path} is not a model directory: no config.json (found: {', '.join(present[:8]) or 'nothing'}); "
            f"create one with `{MAKES[expect]}`"
        )
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise UsageError(
            f"{flag} {path} has no weights (expected model.safetensors; found: {', '.join(present[:8])}); "
            f"re-run `{MAKES[expect]}`"
        )
    from_config = _kind_from_config(p)
    recorded = (manifest or {}).get("kind")
    if recorded and from_config and recorded != from_config:
        raise UsageError(f"{flag} {path}: its {MANIFEST} says {recorded} but config.json describes a {from_config}; "
                         f"one of them was edited: re-run the stage that wrote it")
    kind = recorded or from_config
    if kind != expect:
        stage = (manifest or {}).get("stage")
        found = f"a {kind} artifact" + (f" from `llm {stage}`" if stage else "") if kind else "a model of unknown kind"
        raise UsageError(f"{flag} {path} is {found}, but a {expect} is expected; pass the directory written by `{MAKES[expect]}`")
    for w in sorted(p.glob("*.safetensors")):
        why = check_safetensors(w)
        if why:
            raise UsageError(f"{flag} {path}: {w.name} cannot be read: {why}; re-run the stage that wrote it")
    why = config_mismatch(p)
    if why:
        raise UsageError(f"{flag} {path}: {why}; put back the config.json written with these weights")
    if verify and manifest is not None:
        require_checksums(p, manifest, f"{flag} {path}")
    return Artifact(path=str(p), kind=kind, manifest=manifest)


def require_checksums(path: str | Path, manifest: dict | None, where: str) -> None:
    """--verify: every file of `path` against the sha256 its manifest records; UsageError in one line naming
    `where` (e.g. "--policy runs/sft") when the manifest records none or a file differs."""
    if not (manifest or {}).get("checksums"):
        raise UsageError(f"{where}: --verify asked, but its {MANIFEST} records no checksums (written by an "
                         f"older version, or missing); drop --verify or re-run the stage that wrote it")
    why = verify_checksums(path, manifest)
    if why:
        raise UsageError(f"{where}: {why}; re-run the stage that wrote it")


def parent_record(art: Artifact) -> dict:
    """The `parent` entry of a manifest: path, content digest and stage of the input artifact."""
    if art.hub:
        return {"path": art.path, "digest": None, "stage": None, "hub": True}
    return {"path": str(Path(art.path).resolve()), "digest": artifact_digest(Path(art.path)), "stage": art.stage}


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """Around a save of model weights: no "Removed shared tensor" warning and no "Writing model shards" bar.

    Both come from tied input/output embeddings and from transformers' shard loop:
    Accelerate's save_state drops the tied copy and says so at WARNING on every
    save, although loading restores the tie; save_pretrained shows a progress bar
    even for one shard. Only these two are turned off, and only while saving.
    """
    import transformers

    log = logging.getLogger("accelerate.utils.other")
    level = log.level
    bars = transformers.utils.logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def staging_dir(out: Path) -> Path:
    """A fresh staging directory inside `out` (same filesystem, so renames are atomic)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(
    staging: Path,
    out: Path,
    *,
    stage: str,
    config: dict,
    metrics: dict,
    parent: dict | None,
    seed: int | None,
    extra: dict | None = None,
) -> Path:
    """Move the staged files into `out` and write the manifest last.

    Top-level files and directories in staging replace those in out, one atomic
    rename each; the old manifest is removed first so that a crash in between
    leaves a directory that `is_complete` rejects.
    """
    out, staging = Path(out), Path(staging)
    atomic_write_text(out / PUBLISHING, str(os.getpid()))
    old = out / MANIFEST
    if old.exists():
        old.unlink()
    files: dict[str, int] = {}
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
        if dest.is_file():
            files[item.name] = dest.stat().st_size
        else:
            for sub in sorted(dest.rglob("*")):
                if sub.is_file():
                    files[str(sub.relative_to(out))] = sub.stat().st_size
    staging.rmdir()
    manifest = {
        "stage": stage,
        "kind": STAGE_KIND[stage],
        "parent": parent,
        "config": config,
        "metrics": metrics,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "seed": seed,
        "command": " ".join(sys.argv),
        "files": files,
        "checksums": {name: file_digest(out / name) for name in files},
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(out / MANIFEST, manifest)
    (out / PUBLISHING).unlink()
    return out


def save_model_artifact(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    *,
    stage: str,
    config: dict,
    metrics: dict,
    parent: dict | None,
    seed: int | None,
    extra_dirs: dict[str, Any] | None = None,
    extra: dict | None = None,
) -> Path:
    """Save a transformers model (+ tokenizer) as a complete artifact in `out`.

    `extra_dirs` maps a sub-directory name to a callable `f(path)` that writes
    more files there (an adapter, a critic) before publishing.
    """
    from lifecycle.tokenizer import save_tokenizer

    out = Path(out)
    staging = staging_dir(out)
    with quiet_saving():
        model.save_pretrained(staging, safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, staging)
    for name, writer in (extra_dirs or {}).items():
        d = staging / name
        d.mkdir()
        writer(d)
    return publish(staging, out, stage=stage, config=config, metrics=metrics, parent=parent, seed=seed, extra=extra)
