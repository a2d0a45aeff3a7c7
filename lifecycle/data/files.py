"""Read users' own data: local .txt/.jsonl/.json/.csv/.parquet files or a `datasets` hub id.

Local files are read here rather than through `datasets.load_dataset` so that a
bad file gets one clear line naming the file, the line and the fix. A hub id
goes through `datasets` (it works for users who are online).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lifecycle.artifacts import looks_like_hub_id
from lifecycle.errors import UsageError

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {i} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {i} is a JSON {type(row).__name__}, not an object; each line must be one JSON object")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix it or use .jsonl, one object per line") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{path} must hold a list of JSON objects (one per example)")
    return data


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        try:
            return [dict(r) for r in csv.DictReader(f)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"{path} cannot be read as UTF-8 CSV ({e}); fix the file") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UsageError(f"{path} cannot be read as parquet ({type(e).__name__}: {str(e)[:120]})") from None


def read_records(source: str, text_column: str = "text") -> list[dict]:
    """Rows of one source. A .txt file gives one {text_column: paragraph} row per blank-line-separated paragraph."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_id(source):
            return _read_hub(source)
        raise UsageError(f"data file {source} not found; pass an existing file ({', '.join(SUFFIXES)}) or a datasets hub id")
    if path.is_dir():
        raise UsageError(f"data path {source} is a directory; pass one or more files ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"data file {source} has an unsupported type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UsageError(f"data file {source} is empty; pass a file with at least one example")
    if suffix == ".txt":
        paragraphs = [p.strip() for p in _read_text(path).replace("\r\n", "\n").split("\n\n")]
        rows = [{text_column: p} for p in paragraphs if p]
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        rows = _read_parquet(path)
    if not rows:
        raise UsageError(f"data file {source} holds no examples; pass a file with at least one")
    return rows


def _read_hub(repo_id: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as e:  # offline, missing, private: all one message
        raise UsageError(f"cannot load dataset {repo_id!r} from the hub ({type(e).__name__}); check the id and your network, or pass a local file") from None
    return [dict(r) for r in ds]


def read_all(sources: list[str], text_column: str = "text") -> list[dict]:
    rows: list[dict] = []
    for s in sources:
        rows.extend(read_records(s, text_column))
    return rows


def text_documents(sources: list[str], text_column: str = "text") -> list[str]:
    """Documents for pretraining: the `text_column` of every row, non-empty strings only."""
    rows = read_all(sources, text_column)
    missing = [i for i, r in enumerate(rows) if text_column not in r]
    if missing:
        cols = ", ".join(sorted(rows[missing[0]].keys())) or "none"
        raise UsageError(
            f"{len(missing)} row(s) have no {text_column!r} column (columns found: {cols}); "
            f"pass --set text_column=NAME to read another column"
        )
    bad = [i for i, r in enumerate(rows) if not isinstance(r[text_column], str)]
    if bad:
        raise UsageError(f"row {bad[0] + 1}: {text_column!r} is a {type(rows[bad[0]][text_column]).__name__}, expected a string")
    docs = [r[text_column] for r in rows if r[text_column].strip()]
    if not docs:
        raise UsageError(f"the data holds no non-empty {text_column!r} text; pass a file with some text")
    return docs
