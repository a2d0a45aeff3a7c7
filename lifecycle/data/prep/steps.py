"""The per-shard work of each step of `llm data`: module-level functions of (input shard, output shard,
settings) that worker processes run. Each one reads one shard and writes one, so any executor that runs
shards independently (a process pool here; a datatrove or Ray Data job on a cluster) gives the same
result. The global parts (which duplicate to keep, the mixture's draw) are decided in the main process
from the small per-document values these functions return. No torch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from lifecycle.data.prep import text as T
from lifecycle.data.prep.shards import read_shard, write_shard

# Set once per worker process by `init_worker` (the pool's initializer).
_DECONTAM: dict[int, dict[str, str]] = {}
_TOKENIZERS: dict[str, object] = {}


def init_worker(decontam_index: dict[int, dict[str, str]] | None) -> None:
    global _DECONTAM
    _DECONTAM = decontam_index or {}


def _keep(cols: dict[str, list], keep: list[bool]) -> dict[str, list]:
    return {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in cols.items()}


# ---------------------------------------------------------------------------
# 1. read: normalise
# ---------------------------------------------------------------------------
def normalize_shard(args: tuple) -> dict:
    """(ids, sources, texts, out, form) -> write the normalised, non-empty documents; lengths in words."""
    ids, sources, texts, out, form = args
    texts = [T.normalize(t, form) for t in texts]
    keep = [bool(t) for t in texts]
    cols = _keep({"id": ids, "source": sources, "text": texts}, keep)
    write_shard(out, cols)
    return {"docs_in": len(ids), "docs_out": len(cols["id"]), "words": [len(t.split()) for t in cols["text"]],
            "removed": [{"id": i, "reason": "empty"} for i, ok in zip(ids, keep) if not ok]}


# ---------------------------------------------------------------------------
# 2. deduplicate: the per-document values (the decision is global)
# ---------------------------------------------------------------------------
def shard_hashes(path: str) -> list[bytes]:
    return [T.text_hash(t) for t in read_shard(path)["text"]]


def shard_minhashes(args: tuple) -> np.ndarray:
    """(path, ngram, num_perm) -> (docs, num_perm) uint64 MinHash signatures of the word-shingle sets."""
    from datasketch import MinHash

    path, n, num_perm = args
    texts = read_shard(path)["text"]
    first = MinHash(num_perm=num_perm, seed=1)
    rows = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=1, permutations=first.permutations, scheme=first.scheme)  # built once
        m.update_batch([s.encode("utf-8") for s in T.ngrams(T.match_words(t), n) or [""]])
        rows.append(m.hashvalues)
    return np.stack(rows) if rows else np.empty((0, num_perm), dtype=first.hashvalues.dtype)


def filter_shard(args: tuple) -> int:
    """(in, out, ids to drop) -> write the other documents."""
    src, out, drop = args
    cols = read_shard(src)
    return write_shard(out, _keep(cols, [i not in drop for i in cols["id"]]))


# ---------------------------------------------------------------------------
# 3. quality, 4. PII, 5. decontamination
# ---------------------------------------------------------------------------
def quality_shard(args: tuple) -> dict:
    src, out, rules = args
    cols = read_shard(src)
    reasons = [T.gopher_reasons(t, rules) for t in cols["text"]]
    write_shard(out, _keep(cols, [not r for r in reasons]))
    return {"docs_in": len(reasons), "docs_out": sum(not r for r in reasons),
            "removed": [{"id": i, "reason": r[0], "rules": r} for i, r in zip(cols["id"], reasons) if r]}


def pii_shard(args: tuple) -> dict:
    src, out = args
    cols = read_shard(src)
    total: Counter = Counter()
    touched = []
    texts = []
    for i, t in zip(cols["id"], cols["text"]):
        new, counts = T.scrub_pii(t)
        texts.append(new)
        if counts:
            total.update(counts)
            touched.append({"id": i, **counts})
    cols["text"] = texts
    write_shard(out, cols)
    return {"docs_in": len(texts), "docs_out": len(texts), "replaced": dict(total), "scrubbed": touched}


def decontam_index(items: list[tuple[str, str]], n: int, min_words: int) -> tuple[dict[int, dict[str, str]], int]:
    """{length: {n-gram: item id}}: each item's n-grams, or the whole item when it is shorter than n;
    and the number of items skipped as shorter than min_words."""
    index: dict[int, dict[str, str]] = {}
    skipped = 0
    for item_id, text in items:
        words = T.match_words(text)
        if len(words) < min_words:
            skipped += 1
            continue
        k = min(n, len(words))
        grams = index.setdefault(k, {})
        for g in T.ngrams(words, k):
            grams.setdefault(g, item_id)
    return index, skipped


def contamination(text: str, index: dict[int, dict[str, str]]) -> tuple[str, str] | None:
    """(item id, the shared n-gram) of the first evaluation n-gram found in `text`, or None."""
    words = T.match_words(text)
    for k in sorted(index):
        grams = index[k]
        for i in range(len(words) - k + 1):
            g = " ".join(words[i:i + k])
            if g in grams:
                return grams[g], g
    return None


def decontam_shard(args: tuple) -> dict:
    src, out = args
    cols = read_shard(src)
    hits = [contamination(t, _DECONTAM) for t in cols["text"]]
    write_shard(out, _keep(cols, [h is None for h in hits]))
    return {"docs_in": len(hits), "docs_out": sum(h is None for h in hits),
            "removed": [{"id": i, "reason": "eval_overlap", "item": h[0], "ngram": h[1]}
                        for i, h in zip(cols["id"], hits) if h]}


# ---------------------------------------------------------------------------
# 6. mixture: counting, then writing the draw
# ---------------------------------------------------------------------------
def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer

        p = Path(path)
        _TOKENIZERS[path] = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    return _TOKENIZERS[path]


def count_shard(args: tuple) -> dict:
    """(path, tokenizer) -> tokens (tokenizer's, no special tokens; or whitespace words) and words per document."""
    path, tokenizer = args
    cols = read_shard(path)
    words = [len(t.split()) for t in cols["text"]]
    if tokenizer:
        tokens = [len(e.ids) for e in _tokenizer(tokenizer).encode_batch(cols["text"], add_special_tokens=False)]
    else:
        tokens = words
    return {"source": cols["source"], "tokens": tokens, "words": words}


def write_output(args: tuple) -> int:
    """(in, out, draws per document, format) -> the output shard: each document as often as it was drawn."""
    src, out, draws, fmt = args
    cols = read_shard(src)
    keep = {"text": [], "source": [], "id": []}
    for i, n in enumerate(draws):
        for _ in range(n):
            for k in keep:
                keep[k].append(cols[k][i])
    return write_shard(out, keep, fmt) if keep["id"] else 0
