"""What `llm eval` writes: eval.json, report.md (one table), plots/*.png and samples.jsonl, each atomically (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lifecycle import artifacts
from lifecycle.artifacts import atomic_write_json, atomic_write_text
from lifecycle.config import EvalConfig
from lifecycle.evaluation.contamination import NGRAM
from lifecycle.training import say

ROWS = [  # (label, path into a model's results)
    ("bits per byte", ("language_modelling", "bits_per_byte")),
    ("perplexity (per token)", ("language_modelling", "perplexity")),
    ("tokens / bytes", None),
    ("gold accuracy", ("world", "gold_accuracy")),
    ("gold accuracy, carry", ("world", "gold_accuracy_carry")),
    ("gold accuracy, no carry", ("world", "gold_accuracy_nocarry")),
    ("mean reward-model score", ("reward_score",)),
    ("answers that end", ("ended",)),
]


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


def _wr(w: dict | None) -> str:
    if not w:
        return "-"
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] ({w['wins']}/{w['ties']}/{w['losses']})"


def metrics_table(res: dict) -> str:
    """One markdown table: a column per model, a row per metric, then the win rates against each one's parent."""
    names = list(res["models"])
    ms = [res["models"][n] for n in names]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, path in ROWS:
        if path is None:
            vals = [f"{_get(m, ('language_modelling', 'tokens'))} / {_get(m, ('language_modelling', 'bytes'))}" for m in ms]
        else:
            vals = [_fmt(_get(m, path)) for m in ms]
            if all(v == "-" for v in vals):
                continue
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if any("win_rate" in m for m in ms):
        lines.append("| compared with | " + " | ".join(_get(m, ("win_rate", "vs")) or "-" for m in ms) + " |")
        for label, key in (("reward-model win rate", "reward"), ("gold win rate", "gold")):
            if any(_get(m, ("win_rate", key)) for m in ms):
                lines.append(f"| {label} | " + " | ".join(_wr(_get(m, ("win_rate", key))) for m in ms) + " |")
    bench = sorted({(t, k) for m in ms for t, v in (m.get("benchmarks") or {}).items() for k in v if k not in ("n", "num_fewshot")})
    for t, k in bench:
        lines.append(f"| {t} {k} | " + " | ".join(_fmt(_get(m, ("benchmarks", t, k))) for m in ms) + " |")
    return "\n".join(lines)


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot(res: dict, plots: Path) -> list[tuple[str, str]]:
    """PNG plots: each metric across the models (a line across stages with --lifecycle), and the win rates with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    names = list(res["models"])
    ms = [res["models"][n] for n in names]
    panels = [(label, path) for label, path in ROWS if path and path != ("ended",)
              and all(isinstance(_get(m, path), (int, float)) for m in ms)]
    made = []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (label, path) in zip(axes[0], panels):
        ys = [_get(m, path) for m in ms]
        if res.get("lifecycle"):
            ax.plot(names, ys, marker="o")
        else:
            ax.bar(names, ys, color=["C0", "C1", "C2", "C3"][: len(ys)])
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    _savefig(fig, plots / "metrics.png")
    plt.close(fig)
    made.append(("metrics across stages" if res.get("lifecycle") else "metrics", "plots/metrics.png"))
    wins = [(n, key, _get(m, ("win_rate", key))) for n, m in zip(names, ms) for key in ("reward", "gold") if _get(m, ("win_rate", key))]
    if wins:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.45 * len(wins)))
        for i, (n, key, w) in enumerate(wins):
            ax.errorbar([w["win_rate"]], [i], xerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]],
                        fmt="o", color="C0" if key == "reward" else "C2", capsize=3)
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(wins)), [f"{n} vs {res['models'][n]['win_rate']['vs']} ({k})" for n, k, _ in wins], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("win rate (ties count half), 95% bootstrap interval", fontsize=8)
        fig.tight_layout()
        _savefig(fig, plots / "win_rates.png")
        plt.close(fig)
        made.append(("win rates", "plots/win_rates.png"))
    return made


def decontamination_lines(dc: dict) -> list[str]:
    lines = ["## Decontamination", "", f"Share of evaluation items with a {dc.get('ngram', NGRAM)}-gram (an item shorter than that: "
             "the whole item) found in the training data the manifests name."]
    if dc.get("training_sources"):
        lines += ["", "Training data read: " + "; ".join(dc["training_sources"]) + "."]
    if dc.get("note"):
        return lines + ["", dc["note"] + "."]
    lines += ["", "| items | count | contaminated | share |", "|---|---|---|---|"]
    for name, v in dc.items():
        if isinstance(v, dict):
            flag = " **(contaminated: the scores on these items overstate)**" if v["contaminated"] else ""
            lines.append(f"| {name} | {v['items']} | {v['contaminated']} | {v['share']:.1%}{flag} |")
    return lines


def write_outputs(out: Path, res: dict, cfg: EvalConfig) -> Path:
    """OUT/samples.jsonl, plots/, report.md, then eval.json last (each by an atomic rename)."""
    out.mkdir(parents=True, exist_ok=True)
    samples = res.pop("samples", None)
    if samples:
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    table = metrics_table(res)
    made = plot(res, out / "plots")
    title = f"Evaluation of the stages of `{res['lifecycle']}`" if res.get("lifecycle") else f"Evaluation of `{cfg.model}`" + (f" against `{cfg.vs}`" if cfg.vs else "")
    lines = [f"# {title}", "", f"Held-out text: {res['items']['text']}."]
    if res["items"].get("prompts"):
        lines.append(f"Prompts: {res['items']['prompts']}; answers {'greedy' if cfg.temperature == 0 else f'sampled at T={cfg.temperature}'}.")
    if res.get("reward_model"):
        lines.append(f"Reward model: `{res['reward_model']}`.")
    lines += ["", table, "",
              "Bits per byte = total nats / (ln 2 x UTF-8 bytes), comparable across tokenizers; perplexity is per token of each "
              "model's own tokenizer. Win rates: share of prompts where the model's answer beats the other's "
              "(reward model: higher score; gold: right where the other is wrong); ties count half; "
              "[95% percentile-bootstrap interval over prompts] (wins/ties/losses).", ""]
    for caption, rel in made:
        lines += [f"## {caption[:1].upper() + caption[1:]}", "", f"![{caption}]({rel})", ""]
    if res.get("decontamination"):
        lines += decontamination_lines(res["decontamination"]) + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    res["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    res["versions"] = artifacts.versions()
    atomic_write_json(out / "eval.json", res)
    print(table)
    say(f"eval: wrote {out / 'eval.json'} and {out / 'report.md'}")
    return out / "eval.json"
