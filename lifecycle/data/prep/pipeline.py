"""`llm data`, step by step: read -> exact dedup -> near dedup -> quality -> PII -> decontaminate -> mix -> write.

Each step reads the previous step's shards and writes its own into the cache
(lifecycle/data/prep/shards.py), keyed by the input digests and the settings
of every step so far; a rerun finds its finished steps there and skips them.
Per-shard work runs in a process pool (lifecycle/data/prep/steps.py); only
small per-document values (hashes, signatures, token counts) come back to
this process, so the texts are never all in memory at once. The output is
assembled in a staging directory inside OUT and moved into place with one
rename per entry, the manifest (data.json) last. No torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lifecycle.artifacts import atomic_write_json, versions
from lifecycle.data.files import CORPUS_MANIFEST
from lifecycle.data.prep import steps as S
from lifecycle.data.prep.shards import Cache, key_of
from lifecycle.data.prep.sources import Source, eval_items, iter_rows, resolve_sources, row_text, world_items
from lifecycle.data.prep.text import GopherRules, parse_ngram_thresholds
from lifecycle.errors import UsageError

HIST_EDGES = [0] + [2 ** k for k in range(21)]  # document length in words: 0, 1, 2, 4, ... 2^20


class Workers:
    """A process pool started on first use (a warm rerun starts none); `num_proc=1` runs in this process."""

    def __init__(self, num_proc: int, init: Callable[[], tuple]):
        self.num_proc, self.init, self.pool, self.ready = num_proc, init, None, False

    def map(self, fn: Callable, tasks: Iterable) -> list:
        if self.num_proc == 1:
            if not self.ready:
                S.init_worker(*self.init())
                self.ready = True
            return [fn(t) for t in tasks]
        if self.pool is None:  # spawn: the workers import only this package, never the parent's state
            self.pool = ProcessPoolExecutor(self.num_proc, mp_context=mp.get_context("spawn"),
                                            initializer=S.init_worker, initargs=self.init())
        try:
            return list(self.pool.map(fn, tasks))
        except BrokenProcessPool:  # a worker died (killed, out of memory): one line, not a hang
            raise UsageError(f"a data worker process died during {fn.__name__}; rerun (finished steps are cached), "
                             f"with fewer --num-proc if memory ran out") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _windows(it: Iterable, n: int) -> Iterable[list]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def _hist(words: Iterable[int], weights: Iterable[int] | None = None) -> list[int]:
    w = np.fromiter(words, dtype=np.int64)
    counts, _ = np.histogram(w, bins=HIST_EDGES + [2 ** 62], weights=None if weights is None else np.fromiter(weights, dtype=np.int64))
    return [int(c) for c in counts]


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# The mixture's arithmetic (pure)
# ---------------------------------------------------------------------------
def quotas(available: dict[str, int], weights: dict[str, float], target: int) -> dict[str, int]:
    """Tokens to draw per source: `target` split by the weights; target 0 is the largest total at which no
    source has to be repeated (the scarcest source, relative to its share, is taken whole)."""
    total_w = sum(weights.values())
    share = {s: w / total_w for s, w in weights.items()}
    if target <= 0:
        target = min(available[s] / share[s] for s in share if share[s] > 0)
    return {s: int(round(target * share[s])) for s in share}


def draw(tokens: list[int], quota: int, rng: random.Random) -> list[int]:
    """How often each document is drawn so that the drawn tokens come as close to `quota` as the documents
    allow without passing it: whole passes over the source while they fit, then documents in a seeded
    random order, each one taken if it still fits (so the shortfall is smaller than any document skipped)."""
    total = sum(tokens)
    n = [0] * len(tokens)
    if total == 0 or quota <= 0:
        return n
    passes, rest = divmod(quota, total)
    n = [passes] * len(tokens)
    order = list(range(len(tokens)))
    rng.shuffle(order)
    for i in order:
        if tokens[i] <= rest:
            n[i] += 1
            rest -= tokens[i]
    return n


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------
class Pipeline:
    def __init__(self, cfg: Any, sources: list[Source], items: list[tuple[str, str]], cache: Cache):
        self.cfg, self.sources, self.items, self.cache = cfg, sources, items, cache
        self.workers = Workers(cfg.num_proc, self._init_args)
        self.summaries: list[dict] = []
        self.dir: Path | None = None     # the current step's cache entry
        self.state: dict = {}
        self.key = ""

    def _init_args(self) -> tuple:
        if not self.cfg.decontaminate:
            return (None,)
        index, self.skipped_items = S.decontam_index(self.items, self.cfg.decontam_ngram, self.cfg.decontam_min_words)
        return (index,)

    def paths(self) -> list[str]:
        return [str(self.dir / s) for s in self.state["shards"]]

    def step(self, name: str, enabled: bool, settings: dict, compute: Callable[[Path], dict]) -> None:
        """Run (or find in the cache) one step; record its summary."""
        if not enabled:
            self.summaries.append({"step": name, "enabled": False, "settings": settings})
            return
        key = key_of(self.key, name, settings)
        state = self.cache.load(name, key)
        cached = state is not None
        if state is None:
            t0 = time.perf_counter()
            tmp = self.cache.begin(name, key)
            state = compute(tmp)
            state["seconds"] = round(time.perf_counter() - t0, 3)
            state["docs_per_s"] = round(state["docs_in"] / max(state["seconds"], 1e-9), 1)
            self.cache.commit(name, key, tmp, state)
        self.dir, self.state, self.key = self.cache.entry(name, key), state, key
        summary = {k: v for k, v in state.items() if k not in ("shards", "words", "hist", "docs")}
        self.summaries.append({"step": name, "enabled": True, "cached": cached, "key": key, "settings": settings, **summary})

    def _shard_names(self, n: int) -> list[str]:
        return [f"shard-{i:05d}.parquet" for i in range(n)]

    # --- 1. read ---------------------------------------------------------------------------------------
    def read(self, tmp: Path) -> dict:
        cfg = self.cfg

        def batches():
            for src in self.sources:
                ids, texts = [], []
                for i, row in enumerate(iter_rows(src)):
                    ids.append(f"{src.name}:{i}")
                    texts.append(row_text(row, cfg.text_column, f"source {src.name} row {i + 1}"))
                    if len(ids) == cfg.shard_size:
                        yield ids, [src.name] * len(ids), texts
                        ids, texts = [], []
                if ids:
                    yield ids, [src.name] * len(ids), texts

        shards, removed, words, per_source, per_source_words = [], [], [], Counter(), Counter()
        docs_in = 0
        for window in _windows(batches(), max(2, 2 * cfg.num_proc)):
            names = self._shard_names(len(shards) + len(window))[len(shards):]
            results = self.workers.map(S.normalize_shard, [(*b, str(tmp / n), cfg.unicode_form) for b, n in zip(window, names)])
            for b, n, r in zip(window, names, results):
                shards.append(n)
                docs_in += r["docs_in"]
                per_source[b[1][0]] += r["docs_in"]
                removed += r["removed"]
                words += r["words"]
                per_source_words[b[1][0]] += sum(r["words"])
        for src in self.sources:
            if not per_source[src.name]:
                raise UsageError(f"--source {src.name}={src.path} holds no documents; pass a file with at least one")
        _write_jsonl(tmp / "removed.jsonl", removed)
        return {"shards": shards, "docs_in": docs_in, "docs_out": docs_in - len(removed),
                "removed": dict(Counter(r["reason"] for r in removed)), "per_source": dict(per_source), "per_source_words": dict(per_source_words),
                "words_in": sum(words), "hist": _hist(words)}

    # --- 2. deduplicate ----------------------------------------------------------------------------------
    def _drop(self, tmp: Path, drops: list[set], removed: list[dict], extra: dict | None = None) -> dict:
        names = self.state["shards"]
        kept = self.workers.map(S.filter_shard, [(str(self.dir / n), str(tmp / n), d) for n, d in zip(names, drops)])
        _write_jsonl(tmp / "removed.jsonl", removed)
        docs_in = sum(kept) + len(removed)
        return {"shards": names, "docs_in": docs_in, "docs_out": sum(kept),
                "removed": dict(Counter(r["reason"] for r in removed)), **(extra or {})}

    def exact_dedup(self, tmp: Path) -> dict:
        first: dict[bytes, str] = {}
        drops, removed = [], []
        for path, hashes in zip(self.paths(), self.workers.map(S.shard_hashes, self.paths())):
            ids = S.read_shard(path)["id"]
            drop = set()
            for i, h in zip(ids, hashes):
                if h in first:
                    drop.add(i)
                    removed.append({"id": i, "reason": "exact_duplicate", "of": first[h]})
                else:
                    first[h] = i
            drops.append(drop)
        return self._drop(tmp, drops, removed)

    def near_dedup(self, tmp: Path) -> dict:
        from datasketch import MinHash, MinHashLSH

        cfg = self.cfg
        lsh = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.minhash_perm)
        scheme = MinHash(num_perm=cfg.minhash_perm, seed=1).scheme
        drops, removed = [], []
        paths = self.paths()
        for window in _windows(paths, max(2, 2 * cfg.num_proc)):
            sigs = self.workers.map(S.shard_minhashes, [(p, cfg.minhash_ngram, cfg.minhash_perm) for p in window])
            for path, sig in zip(window, sigs):
                drop = set()
                for i, row in zip(S.read_shard(path)["id"], sig):
                    m = MinHash(num_perm=cfg.minhash_perm, seed=1, hashvalues=row, scheme=scheme)
                    found = lsh.query(m)
                    if found:
                        drop.add(i)
                        removed.append({"id": i, "reason": "near_duplicate", "of": min(found)})
                    else:
                        lsh.insert(i, m)
                drops.append(drop)
        return self._drop(tmp, drops, removed, {"bands_rows": list(lsh.b_r) if hasattr(lsh, "b_r") else [lsh.b, lsh.r]})

    # --- 3.-5. per-document filters and scrubbing ------------------------------------------------------------
    def _map(self, tmp: Path, fn: Callable, extra_args: tuple) -> list[dict]:
        """`fn` over every shard (input, output in tmp with the same name, settings)."""
        return self.workers.map(fn, [(str(self.dir / n), str(tmp / n), *extra_args) for n in self.state["shards"]])

    def _filtered(self, tmp: Path, results: list[dict]) -> dict:
        removed = [r for res in results for r in res["removed"]]
        _write_jsonl(tmp / "removed.jsonl", removed)
        return {"shards": self.state["shards"], "docs_in": sum(r["docs_in"] for r in results),
                "docs_out": sum(r["docs_out"] for r in results), "removed": dict(Counter(r["reason"] for r in removed))}

    def quality(self, tmp: Path) -> dict:
        return self._filtered(tmp, self._map(tmp, S.quality_shard, (gopher_rules(self.cfg),)))

    def pii(self, tmp: Path) -> dict:
        results = self._map(tmp, S.pii_shard, ())
        scrubbed = [r for res in results for r in res["scrubbed"]]
        _write_jsonl(tmp / "scrubbed.jsonl", scrubbed)
        replaced = Counter()
        for res in results:
            replaced.update(res["replaced"])
        n = sum(r["docs_in"] for r in results)
        return {"shards": self.state["shards"], "docs_in": n, "docs_out": n, "removed": {},
                "replaced": dict(replaced), "docs_scrubbed": len(scrubbed)}

    def decontaminate(self, tmp: Path) -> dict:
        out = self._filtered(tmp, self._map(tmp, S.decontam_shard, ()))
        out["eval_items"] = len(self.items)
        return out

    # --- 6. mixture and output ---------------------------------------------------------------------------------
    def mix(self, tmp: Path) -> dict:
        cfg = self.cfg
        paths = self.paths()
        counts = self.workers.map(S.count_shard, [(p, cfg.tokenizer) for p in paths])
        docs: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # source -> [(shard, row, tokens)]
        for k, c in enumerate(counts):
            for j, (s, t) in enumerate(zip(c["source"], c["tokens"])):
                docs[s].append((k, j, t))
        available = {s.name: sum(t for _, _, t in docs[s.name]) for s in self.sources}
        weighted = cfg.target_tokens > 0 or any(s.weight is not None for s in self.sources)
        draws = [[0] * len(c["tokens"]) for c in counts]
        if weighted:
            empty = [s for s in available if not available[s]]
            if empty:
                raise UsageError(f"source(s) {', '.join(empty)} have no documents left after filtering, so their weights cannot be met; drop them or relax the filters")
            want = quotas(available, {s.name: s.weight if s.weight is not None else 1.0 for s in self.sources}, cfg.target_tokens)
        else:
            want = dict(available)
        for s in self.sources:
            rng = random.Random(f"{cfg.seed}:{s.name}")
            n = draw([t for _, _, t in docs[s.name]], want[s.name], rng) if weighted else [1] * len(docs[s.name])
            for (k, j, _), m in zip(docs[s.name], n):
                draws[k][j] = m
        ext = "parquet" if cfg.output_format == "parquet" else "jsonl"
        names = [f"part-{i:05d}.{ext}" for i in range(len(paths))]
        written = self.workers.map(S.write_output, [(p, str(tmp / n), d, cfg.output_format) for p, n, d in zip(paths, names, draws)])
        shards = [n for n, w in zip(names, written) if w]
        got = {s.name: 0 for s in self.sources}
        drawn_docs = {s.name: 0 for s in self.sources}
        for c, d in zip(counts, draws):
            for s, t, m in zip(c["source"], c["tokens"], d):
                got[s] += t * m
                drawn_docs[s] += m
        words = [w for c in counts for w in c["words"]]
        weights = [m for d in draws for m in d]
        n_in = sum(len(c["tokens"]) for c in counts)
        return {"shards": shards, "docs_in": n_in, "docs_out": sum(weights), "removed": {"not_drawn": sum(m == 0 for m in weights)},
                "tokens_available": available, "tokens_target": want, "tokens": got, "docs_per_source": drawn_docs, "weighted": weighted,
                "unit": f"tokens of {cfg.tokenizer}" if cfg.tokenizer else "whitespace-separated words",
                "hist": _hist(words, weights), "rows_written": sum(written)}


def gopher_rules(cfg: Any) -> GopherRules:
    return GopherRules(
        min_words=cfg.min_words, max_words=cfg.max_words, min_mean_word_length=cfg.min_mean_word_length,
        max_mean_word_length=cfg.max_mean_word_length, max_symbol_word_ratio=cfg.max_symbol_word_ratio,
        max_bullet_lines=cfg.max_bullet_lines, max_ellipsis_lines=cfg.max_ellipsis_lines,
        min_alpha_words=cfg.min_alpha_words, min_stop_words=cfg.min_stop_words,
        max_dup_line_fraction=cfg.max_dup_line_fraction, max_dup_paragraph_fraction=cfg.max_dup_line_fraction,
        max_dup_line_chars=cfg.max_dup_line_chars, max_dup_paragraph_chars=cfg.max_dup_line_chars,
        top_ngram_chars=parse_ngram_thresholds(cfg.top_ngram_chars), dup_ngram_chars=parse_ngram_thresholds(cfg.dup_ngram_chars))
