"""The inputs of `llm data`: `--source NAME=PATH[:WEIGHT]` specs, their files and digests, their rows read one
file at a time, and the evaluation items to decontaminate against. All input errors are found here, before
anything is written. No torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lifecycle.artifacts import file_digest, looks_like_hub_id
from lifecycle.data import files
from lifecycle.errors import UsageError


@dataclass
class Source:
    """One input: its name, where it lives, its mixture weight (None: not given) and its files with digests."""

    name: str
    path: str
    weight: float | None
    files: list[dict] = field(default_factory=list)   # [{"path", "bytes", "sha256"}]
    hub: bool = False

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.path.encode() if self.hub else b"")
        for f in self.files:
            h.update(f["sha256"].encode())
        return h.hexdigest()


def parse_source(spec: str) -> tuple[str, str, float | None]:
    """`web=data/crawl.jsonl.gz:0.7` -> ("web", "data/crawl.jsonl.gz", 0.7); a bare PATH is named after its file."""
    name, eq, rest = spec.partition("=")
    if not eq:
        name, rest = Path(spec.rstrip("/")).name.split(".")[0], spec
    name = name.strip()
    if not name or not rest:
        raise UsageError(f"--source {spec!r} is not NAME=PATH[:WEIGHT]; write for example --source web=crawl.jsonl:0.7")
    weight = None
    if ":" in rest and not Path(rest).exists():
        rest, _, w = rest.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            raise UsageError(f"--source {spec!r}: the weight {w!r} is not a number; write NAME=PATH:WEIGHT with WEIGHT such as 0.7") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(f"--source {spec!r}: the weight {w} must be a positive number")
    return name, rest, weight


def _files_of(path: str, flag: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        found = files.directory_files(p)
    elif p.is_file():
        found = [p]
    else:
        raise UsageError(f"{flag} {path} not found; pass an existing file or directory ({', '.join(files.SUFFIXES)}) or a datasets hub id")
    for f in found:
        if files.suffix_of(f) not in files.SUFFIXES:
            raise UsageError(f"{flag} {f} has an unsupported type {files.suffix_of(f) or '(none)'}; use one of {', '.join(files.SUFFIXES)}")
        if f.stat().st_size == 0:
            raise UsageError(f"{flag} {f} is empty; pass a file with at least one document")
    return found


def resolve_sources(specs: list[str]) -> list[Source]:
    """Every source checked and digested; all problems reported at once."""
    out: list[Source] = []
    problems: list[str] = []
    for spec in specs:
        try:
            name, path, weight = parse_source(spec)
            if any(s.name == name for s in out):
                raise UsageError(f"--source name {name!r} is used twice; give each source its own NAME")
            if not Path(path).expanduser().exists() and looks_like_hub_id(path):
                out.append(Source(name, path, weight, hub=True))
                continue
            found = _files_of(path, f"--source {name}=")
            out.append(Source(name, path, weight, [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_digest(f)}
                                                   for f in found]))
        except UsageError as e:
            problems.append(str(e))
    if problems:
        raise UsageError("; ".join(problems))
    return out


def iter_rows(src: Source) -> Iterator[dict]:
    """The rows of a source, one file at a time (JSONL and parquet row by row, other types file by file)."""
    if src.hub:
        yield from files.read_records(src.path)
        return
    for f in src.files:
        path = Path(f["path"])
        suffix = files.suffix_of(path)
        if suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
            yield from files.iter_jsonl(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                    yield from batch.to_pylist()
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise UsageError(f"{path} cannot be read as parquet ({type(e).__name__}: {str(e)[:120]})") from None
        else:
            yield from files.read_records(str(path))


def row_text(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise UsageError(f"{where} has no {column!r} column (columns: {', '.join(sorted(row)) or 'none'}); pass --text-column NAME")
    text = row[column]
    if not isinstance(text, str):
        raise UsageError(f"{where}: {column!r} is a {type(text).__name__}, expected a string")
    return text


# ---------------------------------------------------------------------------
# Evaluation items
# ---------------------------------------------------------------------------
EVAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".csv", ".parquet", ".txt")


def _strings(value) -> list[str]:
    """Every string inside a row's value: plain strings, lists of them, chat messages' contents."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return _strings(value.get("content")) if "content" in value else [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def eval_items(paths: list[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """[(item id, text)] of every --eval-set file (a row's string fields joined), and the files with digests."""
    items: list[tuple[str, str]] = []
    records: list[dict] = []
    problems: list[str] = []
    for path in paths:
        p = Path(path).expanduser()
        if not p.is_file():
            problems.append(f"--eval-set {path} not found; pass an existing file ({', '.join(EVAL_SUFFIXES)})")
            continue
        if files.suffix_of(p) not in EVAL_SUFFIXES:
            problems.append(f"--eval-set {path} has an unknown format {files.suffix_of(p) or '(none)'}; use one of {', '.join(EVAL_SUFFIXES)}")
            continue
        try:
            rows = files.read_records(str(p))
        except UsageError as e:
            problems.append(str(e))
            continue
        records.append({"path": str(p), "bytes": p.stat().st_size, "sha256": file_digest(p), "items": len(rows)})
        items += [(f"{p.name}:{i}", "\n".join(_strings(row))) for i, row in enumerate(rows)]
    if problems:
        raise UsageError("; ".join(problems))
    return items, records


def world_items() -> list[tuple[str, str]]:
    """The built-in world's held-out problems as every phrasing the world writes them, and as the question."""
    from lifecycle.data import world

    out = []
    for p in world.heldout_problems():
        out.append((f"world:{p.a}+{p.b}:question", p.question))
        for k, t in enumerate(world.TEMPLATES):
            out.append((f"world:{p.a}+{p.b}:{k}", t.format(a=p.a, b=p.b, c=p.answer)))
    return out
