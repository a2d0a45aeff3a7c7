"""report.md of `llm data`: a table per step (what it removed and why, how fast) and two plots
(document lengths before and after, each source's share). matplotlib is imported only here. No torch.
"""

from __future__ import annotations

from pathlib import Path

from lifecycle.data.prep.pipeline import HIST_EDGES

ABOUT = {
    "read": "Rows read and normalised (Unicode {unicode_form}, whitespace); empty documents dropped.",
    "exact_dedup": "Documents whose normalised text equals an earlier one (blake2b hash); the first is kept.",
    "near_dedup": "MinHash LSH over word {minhash_ngram}-gram shingles, {minhash_perm} permutations, threshold {minhash_threshold}; the first of each group is kept.",
    "quality": "Gopher quality and repetition rules (Rae et al. 2021, appendix A); the first rule broken is the reason.",
    "pii": "E-mail, phone, IP and Luhn-valid card numbers replaced by typed placeholders.",
    "decontaminate": "Documents sharing a {decontam_ngram}-word n-gram (or a whole shorter item) with an evaluation item.",
    "mix": "Per-source weights drawn to the target with seed {seed}.",
}


def _table(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plots(out: Path, hist_before: list[int], hist_after: list[int], shares: dict[str, dict[str, float]]) -> list[str]:
    """Write plots/lengths.png and plots/shares.png; the relative paths, or [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    (out / "plots").mkdir(exist_ok=True)
    labels = [f"<{HIST_EDGES[i + 1]}" if i + 1 < len(HIST_EDGES) else f">={HIST_EDGES[-1]}" for i in range(len(hist_before))]
    last = max([i for i, (a, b) in enumerate(zip(hist_before, hist_after)) if a or b] or [0]) + 1
    first = min([i for i, (a, b) in enumerate(zip(hist_before, hist_after)) if a or b] or [0])
    x = range(first, last)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in x], hist_before[first:last], width=0.4, label="read")
    ax.bar([i + 0.2 for i in x], hist_after[first:last], width=0.4, label="output (with repeats)")
    ax.set_xticks(list(x), labels[first:last], rotation=45)
    ax.set_xlabel("document length (words)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots/lengths.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(next(iter(shares.values())))
    for k, (when, share) in enumerate(shares.items()):
        ax.bar([i + (k - (len(shares) - 1) / 2) * 0.25 for i in range(len(names))], [share[n] for n in names], width=0.25, label=when)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots/shares.png", dpi=80)
    plt.close(fig)
    return ["plots/lengths.png", "plots/shares.png"]


def _share(d: dict[str, int]) -> dict[str, float]:
    total = sum(d.values()) or 1
    return {k: v / total for k, v in d.items()}


def write_report(out: Path, manifest: dict, title: str) -> None:
    cfg = manifest["config"]
    steps = manifest["steps"]
    read = next(s for s in steps if s["step"] == "read")
    mix = next(s for s in steps if s["step"] == "mix")
    lines = [f"# Corpus report: {title}", "",
             f"{mix['docs_out']} documents, {sum(mix['tokens'].values())} {mix['unit']}, in {len(manifest['shards'])} "
             f"{cfg['output_format']} shard(s); written by `llm data` in {manifest['seconds']:.1f} s.", "",
             "## Inputs", "",
             _table([[i["name"], i["path"], i["weight"] if i["weight"] is not None else "-", len(i["files"]),
                      read["per_source"].get(i["name"], 0)] for i in manifest["inputs"]],
                    ["source", "path", "weight", "files", "documents"]), "",
             "## Steps", "",
             _table([[s["step"], "on" if s["enabled"] else "off", s.get("docs_in", "-"), s.get("docs_out", "-"),
                      ", ".join(f"{k} {v}" for k, v in s.get("removed", {}).items()) or "-",
                      s.get("seconds", "-"), s.get("docs_per_s", "-"), "yes" if s.get("cached") else "no"]
                     for s in steps],
                    ["step", "", "docs in", "docs out", "removed (why)", "seconds", "docs/s", "from cache"]), ""]
    for s in steps:
        if not s["enabled"]:
            continue
        lines += [f"### {s['step']}", "", ABOUT[s["step"]].format(**cfg), ""]
        if s["step"] == "pii":
            lines += [_table([[k, v] for k, v in sorted(s["replaced"].items())] or [["-", 0]], ["placeholder type", "replaced"]), "",
                      f"{s['docs_scrubbed']} document(s) changed; the list is in scrubbed.jsonl.", ""]
        elif s["step"] == "decontaminate":
            lines += [f"Checked against {s['eval_items']} evaluation item(s); every removed document is listed in removed.jsonl "
                      "with the item and the shared n-gram.", ""]
        elif s["step"] == "mix":
            lines += [_table([[n, s["tokens_available"][n], s["tokens_target"][n], s["tokens"][n],
                               f"{_share(s['tokens'])[n]:.4f}", s["docs_per_source"][n]] for n in s["tokens"]],
                             ["source", "available", "target", "drawn (exact)", "share", "documents"]), "",
                      f"Tokens are {s['unit']}." + ("" if s["weighted"] else " No weights given: every document once."), ""]
        elif s.get("removed"):
            lines += ["Removed documents are listed in removed.jsonl.", ""]
    if manifest.get("plots"):
        lines += ["## Plots", "", "![document lengths](plots/lengths.png)", "", "![source shares](plots/shares.png)", ""]
    else:
        lines += ["(No plots: matplotlib is not installed.)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
