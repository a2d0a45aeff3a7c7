"""Shard files and the step cache of `llm data`.

A shard is a parquet file of documents with the columns `id` ("source:row"),
`source` and `text` (the mixture adds `n`, how often the document is drawn).
Every step reads the shards of the step before and writes its own into a
cache entry, a directory named after the step and a key: a hash of the input
digests and of the settings of this step and of every step before it. An
entry is written under a temporary name and renamed when complete, so a
killed run never leaves an entry that a rerun would trust. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATE = "state.json"


def read_shard(path: str | Path) -> dict[str, list]:
    """A shard as columns: {"id": [...], "source": [...], "text": [...], ...}."""
    return pq.read_table(path).to_pydict()


def write_shard(path: str | Path, columns: dict[str, list], fmt: str = "parquet") -> int:
    """Write columns as one parquet (or JSONL) file via a temporary name; returns the number of rows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = len(next(iter(columns.values()))) if columns else 0
    if fmt == "parquet":
        pq.write_table(pa.table(columns), tmp, compression="zstd")
    else:
        names = list(columns)
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({k: columns[k][i] for k in names}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return n


def key_of(*parts) -> str:
    """A stable 16-hex-digit key of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cache:
    """Finished steps under `root` (None: a throw-away directory that is removed at the end)."""

    def __init__(self, root: Path | None, scratch: Path):
        self.root = root
        self.scratch = scratch

    def entry(self, step: str, key: str) -> Path:
        return (self.root or self.scratch) / f"{step}-{key}"

    def load(self, step: str, key: str) -> dict | None:
        """The state of a finished entry, or None."""
        if self.root is None:
            return None
        d = self.entry(step, key)
        try:
            state = json.loads((d / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if all((d / s).is_file() for s in state["shards"]):
            return state
        return None

    def begin(self, step: str, key: str) -> Path:
        """A fresh temporary directory for the entry's files."""
        tmp = self.entry(step, key).with_name(f".{step}-{key}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: str, key: str, tmp: Path, state: dict) -> Path:
        (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        final = self.entry(step, key)
        if final.exists():  # an older, incomplete entry of the same key
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final
