"""Read users' own data: local .txt/.jsonl/.json/.csv/.parquet files (JSONL also gzip- or zstd-compressed),
a directory of them (such as the corpus `llm data` writes), or a `datasets` hub id.

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

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".jsonl.zst")
CORPUS_MANIFEST = "data.json"  # written by `llm data`: the shards of a prepared corpus


def suffix_of(path: Path) -> str:
    """The file type: `.jsonl.gz` and `.jsonl.zst` count as one suffix."""
    name = path.name.lower()
    for s in (".jsonl.gz", ".jsonl.zst"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _decompress(path: Path) -> bytes:
    suffix = suffix_of(path)
    try:
        if suffix == ".jsonl.gz":
            import gzip

            return gzip.decompress(path.read_bytes())
        import zstandard

        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    except ImportError:
        raise UsageError(f"{path} is zstd-compressed and the zstandard package is missing; pip install zstandard") from None
    except Exception as e:  # gzip and zstd raise their own types for a corrupt stream
        raise UsageError(f"{path} cannot be decompressed ({type(e).__name__}); check the file") from None


def _read_text(path: Path) -> str:
    try:
        if suffix_of(path) not in (".jsonl.gz", ".jsonl.zst"):
            return path.read_text(encoding="utf-8")
        return _decompress(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); re-encode the file as UTF-8") from None


def iter_jsonl(path: Path):
    """Rows of a (possibly compressed) JSONL file one at a time, with one-line errors naming the line."""
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {i} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {i} is a JSON {type(row).__name__}, not an object; each line must be one JSON object")
        yield row


def _read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def directory_files(path: Path) -> list[Path]:
    """The data files of a directory: the shards its data.json lists (a corpus from `llm data`, which must be
    complete), else every file of a supported type in it, in name order."""
    manifest = path / CORPUS_MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            files, shards = dict(m["files"]), [path / n for n in m["shards"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise UsageError(f"{manifest} is corrupted; re-run `llm data` to write {path} again") from None
        for n, size in files.items():
            if not (path / n).is_file() or (path / n).stat().st_size != size:
                raise UsageError(f"{path} is incomplete ({n} is missing or has the wrong size); re-run `llm data` to write it again")
        return shards
    found = sorted(p for p in path.iterdir() if p.is_file() and suffix_of(p) in SUFFIXES and not p.name.startswith("."))
    if not found:
        raise UsageError(f"data directory {path} holds no data files ({', '.join(SUFFIXES)}); pass files or a directory written by `llm data`")
    return found


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
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a column's name
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
        rows = [r for f in directory_files(path) for r in read_records(str(f), text_column)]
        if not rows:
            raise UsageError(f"data directory {source} holds no examples; pass files with at least one")
        return rows
    suffix = suffix_of(path)
    if suffix not in SUFFIXES:
        raise UsageError(f"data file {source} has an unsupported type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UsageError(f"data file {source} is empty; pass a file with at least one example")
    if suffix == ".txt":
        paragraphs = [p.strip() for p in _read_text(path).replace("\r\n", "\n").split("\n\n")]
        rows = [{text_column: p} for p in paragraphs if p]
    elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
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
