"""`llm run`: the stages of a recipe in order, each output handed to the next.

A recipe is a YAML file (or a directory holding `run.yaml`):

    stages:                 # run in this order
      pretrain: pretrain.yaml   # a stage config file, relative to the recipe...
      sft: {max_steps: 100}     # ...or the options inline

Each stage writes OUT/<stage>. Inputs are wired by name unless the recipe sets
them: sft reads OUT/pretrain, reward reads OUT/sft, ppo reads OUT/sft and
OUT/reward. A stage whose complete artifact already exists is skipped (use
--force to redo it); one that left a complete checkpoint behind (any stage:
lifecycle/checkpoints.py knows our loops' and the Trainer's) is resumed from it. At the end a
table of every stage's held-out metrics is printed and OUT/report.md is written
with plots of each stage's curves.
"""

from __future__ import annotations

import json
from pathlib import Path

from lifecycle import artifacts
from lifecycle.config import STAGE_CONFIGS, build_config, read_yaml
from lifecycle.errors import UsageError

DEFAULT_STAGES = ["pretrain", "sft", "reward", "ppo"]
# stage -> {config field: stage whose output feeds it}
INPUTS = {"sft": {"base": "pretrain"}, "reward": {"base": "sft"}, "ppo": {"policy": "sft", "reward": "reward"}}
# Held-out metrics shown in the summary, per stage: (label, manifest key, key of the value before training).
SUMMARY = {
    "pretrain": [("held-out loss", "eval_loss", "eval_loss_initial"), ("held-out sums correct", "heldout_completion_accuracy", None)],
    "sft": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("eval loss", "eval_loss", None)],
    "reward": [("pairwise accuracy", "eval_accuracy", "eval_accuracy_initial"), ("margin", "eval_margin", None)],
    "ppo": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("RM score", "score", "score_initial"), ("KL to reference", "kl", None)],
}


def load_recipe(recipe: str | None) -> list[tuple[str, str | None, dict]]:
    """[(stage, config path or None, inline options)] in run order."""
    if recipe is None:
        return [(s, None, {}) for s in DEFAULT_STAGES if s in STAGE_CONFIGS]
    path = Path(recipe)
    if path.is_dir():
        path = path / "run.yaml"
    data = read_yaml(path)
    stages = data.get("stages")
    unknown_top = sorted(set(data) - {"stages"})
    if unknown_top:
        raise UsageError(f"recipe {path}: unknown key(s) {', '.join(unknown_top)}; a recipe holds only `stages:`")
    if not isinstance(stages, dict) or not stages:
        raise UsageError(f"recipe {path} must hold `stages:` mapping stage names to config files or options, e.g. `stages: {{pretrain: pretrain.yaml}}`")
    plan = []
    for name, spec in stages.items():
        if name not in DEFAULT_STAGES:
            raise UsageError(f"recipe {path}: unknown stage {name!r}; stages are {', '.join(DEFAULT_STAGES)}")
        if name not in STAGE_CONFIGS:
            raise UsageError(f"recipe {path}: stage {name!r} is not available in this version")
        if spec is None:
            plan.append((name, None, {}))
        elif isinstance(spec, str):
            plan.append((name, str(path.parent / spec), {}))
        elif isinstance(spec, dict):
            plan.append((name, None, dict(spec)))
        else:
            raise UsageError(f"recipe {path}: stage {name!r} must be a config file name or a mapping of options")
    return plan


def plan_from_manifest(src: str, out: Path) -> list[tuple[str, str | None, dict]]:
    """Repeat a finished run from what its manifests recorded: each stage's resolved config and seed.

    `src` is one artifact (its lifecycle.json) or a run directory holding OUT/<stage>
    artifacts. Inputs that pointed at a stage being repeated are rewired to the new
    run directory; other inputs keep the recorded path.
    """
    path = Path(src)
    if (path / artifacts.MANIFEST).is_file():
        found = [(artifacts.read_manifest(path)["stage"], path)]
    elif path.is_dir():
        found = [(s, path / s) for s in DEFAULT_STAGES if (path / s / artifacts.MANIFEST).is_file()]
    else:
        found = []
    if not found:
        raise UsageError(f"--from-manifest {src}: no {artifacts.MANIFEST} there or in its stage subdirectories; pass an artifact or a run directory written by `llm run`")
    repeated = {stage for stage, _ in found}
    plan = []
    for stage, d in found:
        m = artifacts.read_manifest(d)
        if stage not in STAGE_CONFIGS:
            raise UsageError(f"{d}: stage {stage!r} is not available in this version")
        known = {f for f in STAGE_CONFIGS[stage].__dataclass_fields__}
        options = {k: v for k, v in (m.get("config") or {}).items() if k in known and k not in ("out", "resume")}
        for field, src_stage in INPUTS.get(stage, {}).items():
            if src_stage in repeated:
                options[field] = str(out / src_stage)
        plan.append((stage, None, options))
    return plan


def run_lifecycle(recipe: str | None, out: str, *, max_steps: int | None = None, seed: int | None = None,
                  force: bool = False, from_manifest: str | None = None) -> None:
    import importlib

    from lifecycle.checkpoints import check_fingerprint, checkpoint_step, latest_checkpoint

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory path")
    if from_manifest and recipe:
        raise UsageError("give a recipe or --from-manifest, not both")
    plan = plan_from_manifest(from_manifest, root) if from_manifest else load_recipe(recipe)
    # Build and validate every stage's config before running any stage.
    configs = []
    for name, cfg_path, inline in plan:
        overrides = dict(inline)
        overrides["out"] = str(root / name)
        for field, src in INPUTS.get(name, {}).items():
            if field not in overrides and not (cfg_path and field in read_yaml(cfg_path)):
                overrides[field] = str(root / src)
        if max_steps is not None:
            overrides["max_steps"] = max_steps
        if seed is not None:
            overrides["seed"] = seed
        cfg = build_config(STAGE_CONFIGS[name], cfg_path, overrides, check=False)
        if getattr(cfg, "explain", False):
            raise UsageError(f"stage {name} sets explain: true; `llm run` trains every stage: run `llm {name} "
                             f"--explain` on its own, and drop the key from the recipe")
        configs.append((name, cfg))
    for name, cfg in configs:
        stage_out = Path(cfg.out)
        if not force and artifacts.is_complete(stage_out) and (artifacts.read_manifest(stage_out) or {}).get("stage") == name:
            print(f"== {name}: {stage_out} is complete; skipping (--force to redo)")
            continue
        ck = latest_checkpoint(stage_out) if hasattr(cfg, "resume") and not force else None
        if ck is not None:
            check_fingerprint(ck, cfg, fix=f"run with the same options, or add --force to start {name} afresh")
            cfg.resume = True
            print(f"== {name}: resuming from step {checkpoint_step(ck)} ({ck})")
        else:
            print(f"== {name} -> {stage_out}")
        from lifecycle.config import check_config

        check_config(cfg)
        importlib.import_module(f"lifecycle.stages.{name}").run(cfg)
    table = summary_table(root, [n for n, _ in configs])
    print(table)
    report = write_report(root, [n for n, _ in configs], table)
    print(f"report: {report}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
    return str(v)


def summary_table(root: Path, stages: list[str]) -> str:
    """A Markdown table of each stage's held-out metrics: before -> after."""
    rows = ["| stage | metric | before | after | wall time |", "|---|---|---|---|---|"]
    for name in stages:
        m = artifacts.read_manifest(root / name) or {}
        metrics = m.get("metrics", {})
        secs = metrics.get("train_seconds")
        for i, (label, key, before) in enumerate(SUMMARY.get(name, [])):
            if key not in metrics:
                continue
            rows.append(
                f"| {name if i == 0 else ''} | {label} | {_fmt(metrics.get(before)) if before else ''} | "
                f"{_fmt(metrics.get(key))} | {(f'{secs:.0f} s' if secs and i == 0 else '')} |"
            )
    return "\n".join(rows)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# Curves to plot per stage: (title, [metric keys]) read from OUT/<stage>/log.jsonl.
CURVES = {
    "pretrain": [("pretraining loss", ["loss", "eval_loss"])],
    "sft": [("SFT loss", ["loss", "eval_loss"]), ("SFT gold accuracy", ["gold_accuracy"])],
    "reward": [("reward-model loss", ["loss"]), ("reward-model pairwise accuracy", ["eval_accuracy"])],
    "ppo": [("PPO reward-model score", ["score_mean", "eval_score"]), ("PPO KL to reference", ["kl"]), ("PPO gold accuracy", ["eval_gold_accuracy"])],
}


def write_report(root: Path, stages: list[str], table: str) -> Path:
    """OUT/report.md with the summary table and one PNG per curve (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Lifecycle report", "", f"Run directory: `{root}`", "", table, ""]
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name in stages:
        log = _read_log(root / name / "log.jsonl")
        for title, keys in CURVES.get(name, []):
            series = {k: [(r["step"], r[k]) for r in log if isinstance(r.get(k), (int, float))] for k in keys}
            series = {k: v for k, v in series.items() if v}
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for k, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 30 else None, ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fname = f"{name}-{title.split()[-1]}-{'_'.join(keys)}.png".replace(" ", "_")
            fig.savefig(plots / fname, dpi=100)
            plt.close(fig)
            lines += [f"## {title}", "", f"![{title}](plots/{fname})", ""]
    path = root / "report.md"
    artifacts.atomic_write_text(path, "\n".join(lines) + "\n")
    return path
