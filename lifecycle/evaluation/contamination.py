"""Decontamination report: which evaluation items share a 13-gram with the training data (no torch).

The training data is what the manifests' configs name (`data`, `prompts`), up the
chain of parents; a pretrain stage that names none trained on the built-in world,
whose documents are regenerated from the recorded seed. A flagged item's score
overstates what the model can do on unseen text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lifecycle import artifacts
from lifecycle.data import world

NGRAM = 13

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def contaminated(items: list[str], training: list[str], n: int = NGRAM) -> list[bool]:
    """Whether each item shares a word n-gram with the training texts (lower-cased, punctuation dropped); an item
    shorter than n words counts when it occurs whole, as consecutive words, in a training text."""
    item_words = [words(t) for t in items]
    sizes = {min(n, len(w)) for w in item_words if w}
    grams: dict[int, set] = {k: set() for k in sizes}
    for t in training:
        w = words(t)
        for k in sizes:
            grams[k].update(hash(tuple(w[i : i + k])) for i in range(len(w) - k + 1))
    flags = []
    for w in item_words:
        k = min(n, len(w))
        flags.append(bool(w) and any(hash(tuple(w[i : i + k])) in grams[k] for i in range(len(w) - k + 1)))
    return flags


def training_texts(manifests: list[dict | None]) -> tuple[list[str], list[str]]:
    """Text of the training data the manifests' configs name (files only; the built-in world's training splits
    when a pretrain or sft config names no data), and a line per source."""
    from lifecycle.data.files import read_all

    texts, about, seen = [], [], set()
    for m in manifests:
        if not m:
            continue
        cfg, stage = m.get("config") or {}, m.get("stage")
        sources = [cfg[k] for k in ("data", "prompts") if isinstance(cfg.get(k), str) and cfg.get(k)]
        sources += [s for k in ("data",) if isinstance(cfg.get(k), list) for s in cfg[k]]
        for s in sources:
            if s in seen or not Path(s).exists():
                continue
            seen.add(s)
            rows = read_all([s], cfg.get("text_column", "text"))
            texts += [" ".join(_flat(v) for v in r.values()) for r in rows]
            about.append(f"{s} ({len(rows)} rows, from {stage})")
        if not sources and stage == "pretrain" and "world" not in seen:
            seen.add("world")
            texts += world.pretrain_documents(int(cfg.get("world_documents", 60000)), seed=int(cfg.get("seed", 0)))
            about.append("built-in world pretraining documents (regenerated from the recorded seed)")
    return texts, about


def _flat(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return " ".join(_flat(x) for x in v)
    if isinstance(v, dict):
        return " ".join(_flat(x) for x in v.values())
    return ""


def decontamination(model_manifests: list[dict | None], sets: dict[str, list[str]]) -> dict:
    """{set: {"items", "contaminated", "share"}} against the training data named in the models' manifests (and their parents')."""
    manifests: list[dict] = []
    for man in model_manifests:
        while man is not None and len(manifests) < 16:
            manifests.append(man)
            parent = (man.get("parent") or {}).get("path")
            man = artifacts.read_manifest(parent) if parent and Path(parent).is_dir() else None
    training, about = training_texts(manifests)
    out: dict = {"training_sources": about, "ngram": NGRAM}
    if not training:
        out["note"] = "no training data named in the manifests could be read"
        return out
    for name, items in sets.items():
        if items:
            flags = contaminated(items, training)
            out[name] = {"items": len(items), "contaminated": sum(flags), "share": sum(flags) / len(items)}
    return out

