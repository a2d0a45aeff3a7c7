"""`llm data`: prepare a pretraining corpus from raw sources, one documented step at a time.

    0. check every input (sources, weights, evaluation sets, tokenizer) before writing anything
    1. read        any format `llm` reads (+ gzip/zstd JSONL, hub ids); Unicode and whitespace normalised
    2. dedup       exact (hash of the normalised text), then near (MinHash LSH, datasketch), across sources
    3. quality     the Gopher rules (Rae et al. 2021, appendix A)
    4. pii         e-mail, phone, IP, card numbers -> typed placeholders
    5. decontam    13-gram overlap with --eval-set items and the built-in world's held-out problems
    6. mix         per-source weights drawn to a target token count with a seed
    7. publish     shards/, data.json (manifest), report.md, removed.jsonl, atomically into OUT

Each step is switchable in the recipe and cached by its inputs' digests and
settings (lifecycle/data/prep/). Unlike the training stages, this one needs
no torch: it never imports it, so it starts at once and its worker processes
stay small.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lifecycle.artifacts import atomic_write_json, file_digest, versions
from lifecycle.config import DataConfig
from lifecycle.data.files import CORPUS_MANIFEST
from lifecycle.data.prep.pipeline import Pipeline, gopher_rules
from lifecycle.data.prep.report import plots, write_report
from lifecycle.data.prep.shards import Cache, key_of
from lifecycle.data.prep.sources import eval_items, resolve_sources, world_items
from lifecycle.errors import UsageError

PIPELINE_VERSION = 1  # part of every cache key: bump when a step's output changes for the same settings
OUTPUTS = ("shards", "plots", "report.md", "removed.jsonl", "scrubbed.jsonl")


def say(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def run(cfg: DataConfig) -> Path:
    t_start = time.perf_counter()
    # 0. Every input checked, every problem reported at once, before anything is written.
    sources = resolve_sources(cfg.source)
    items, eval_records = eval_items(cfg.eval_set)
    if cfg.world_heldout:
        items += world_items()
    tokenizer_digest = None
    if cfg.tokenizer:
        tok = Path(cfg.tokenizer).expanduser()
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        if not tok.is_file():
            raise UsageError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json there; pass a tokenizer directory (an artifact) or the file")
        tokenizer_digest = file_digest(tok)

    out = Path(cfg.out).expanduser()
    existed = out.exists()
    staging = out / f".staging-{os.getpid()}"
    pipe = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        cache_root = None if cfg.cache_dir.lower() == "none" else Path(cfg.cache_dir or out / ".cache").expanduser()
        pipe = Pipeline(cfg, sources, items, Cache(cache_root, staging / ".work"))
        pipe.key = key_of(PIPELINE_VERSION, [(s.name, s.digest) for s in sources])

        # 1. Read and normalise.
        pipe.step("read", True, {"text_column": cfg.text_column, "unicode_form": cfg.unicode_form.upper(),
                                 "shard_size": cfg.shard_size}, pipe.read)
        # 2. Deduplicate: exact, then near.
        pipe.step("exact_dedup", cfg.exact_dedup, {}, pipe.exact_dedup)
        pipe.step("near_dedup", cfg.near_dedup, {"threshold": cfg.minhash_threshold, "ngram": cfg.minhash_ngram,
                                                 "perm": cfg.minhash_perm}, pipe.near_dedup)
        # 3. Quality.
        pipe.step("quality", cfg.quality, dataclasses.asdict(gopher_rules(cfg)), pipe.quality)
        # 4. PII.
        pipe.step("pii", cfg.pii, {}, pipe.pii)
        # 5. Decontaminate.
        pipe.step("decontaminate", cfg.decontaminate, {"ngram": cfg.decontam_ngram, "min_words": cfg.decontam_min_words,
                                                       "items": key_of(items)}, pipe.decontaminate)
        # 6. Mix.
        pipe.step("mix", True, {"weights": [(s.name, s.weight) for s in sources], "target": cfg.target_tokens,
                                "seed": cfg.seed, "tokenizer": tokenizer_digest, "format": cfg.output_format}, pipe.mix)
        for s in pipe.summaries:
            if s["enabled"]:
                how = "cached" if s["cached"] else f"{s['seconds']:.2f} s, {s['docs_per_s']:.0f} docs/s"
                say(f"{s['step']:<14} {s['docs_in']:>8} -> {s['docs_out']:>8} documents ({how})")

        # 7. Publish: shards, lists of what was removed, report and manifest into OUT (manifest last).
        (staging / "shards").mkdir()
        for name in pipe.state["shards"]:
            _link(pipe.dir / name, staging / "shards" / name)
        _gather(pipe, staging)
        mix = pipe.summaries[-1]
        read = pipe.summaries[0]
        manifest = {
            "stage": "data",
            "kind": "corpus",
            "format": cfg.output_format,
            "shards": [f"shards/{n}" for n in pipe.state["shards"]],
            "inputs": [{"name": s.name, "path": s.path, "weight": s.weight, "hub": s.hub, "files": s.files} for s in sources],
            "eval_sets": eval_records,
            "world_heldout": cfg.world_heldout,
            "steps": pipe.summaries,
            "tokens": mix["tokens"],
            "documents": mix["docs_out"],
            "config": dataclasses.asdict(cfg),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "command": " ".join(sys.argv),
        }
        shares = {"read (words)": _share(read["per_source_words"]) if "per_source_words" in read else None,
                  "available (tokens)": _share(mix["tokens_available"]), "output (tokens)": _share(mix["tokens"])}
        shares = {k: v for k, v in shares.items() if v}
        manifest["plots"] = plots(staging, _state(pipe, "read")["hist"], pipe.state["hist"], shares)
        manifest["seconds"] = round(time.perf_counter() - t_start, 3)
        write_report(staging, manifest, out.name)
        shutil.rmtree(staging / ".work", ignore_errors=True)
        _publish(staging, out, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if pipe is not None:
            pipe.workers.close()
    say(f"wrote {mix['docs_out']} documents, {sum(mix['tokens'].values())} {mix['unit']}, to {out} "
        f"in {manifest['seconds']:.1f} s (report: {out / 'report.md'})")
    return out


def _share(d: dict) -> dict:
    total = sum(d.values()) or 1
    return {k: v / total for k, v in d.items()}


def _state(pipe: Pipeline, step: str) -> dict:
    """The full cached state of an earlier step (its summary lacks the bulky fields)."""
    key = next(s for s in pipe.summaries if s["step"] == step)
    return json.loads((pipe.cache.entry(step, key["key"]) / "state.json").read_text(encoding="utf-8"))


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _gather(pipe: Pipeline, staging: Path) -> None:
    """removed.jsonl (every removed document with its step and reason) and scrubbed.jsonl, from the steps' entries."""
    with open(staging / "removed.jsonl", "w", encoding="utf-8") as out:
        for s in pipe.summaries:
            f = pipe.cache.entry(s["step"], s["key"]) / "removed.jsonl" if s["enabled"] else None
            if f is not None and f.is_file():
                with open(f, encoding="utf-8") as inp:
                    for line in inp:
                        out.write(json.dumps({"step": s["step"], **json.loads(line)}, ensure_ascii=False) + "\n")
    pii = next(s for s in pipe.summaries if s["step"] == "pii")
    if pii["enabled"]:
        shutil.copy2(pipe.cache.entry("pii", pii["key"]) / "scrubbed.jsonl", staging / "scrubbed.jsonl")


def _publish(staging: Path, out: Path, manifest: dict) -> None:
    """Move each staged entry into OUT with one rename, after removing the old manifest; the manifest last,
    so a crash in between leaves a directory that readers refuse (no data.json), never a mixed one."""
    (out / CORPUS_MANIFEST).unlink(missing_ok=True)
    for name in OUTPUTS:
        dest = out / name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        if (staging / name).exists():
            os.replace(staging / name, dest)
    staging.rmdir()
    manifest["files"] = {str(p.relative_to(out)): p.stat().st_size
                         for name in OUTPUTS for p in sorted([out / name, *(out / name).rglob("*")] if (out / name).is_dir() else [out / name])
                         if p.is_file()}
    atomic_write_json(out / CORPUS_MANIFEST, manifest)
