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
from lifecycle.errors import StageRegressed, UsageError

DEFAULT_STAGES = ["pretrain", "sft", "reward", "ppo"]
ALIGN = ("ppo", "grpo", "dpo")  # the alignment methods a recipe's `align:` picks from (default ppo)
STAGES = DEFAULT_STAGES + ["grpo", "dpo"]  # every stage a recipe may name, in lifecycle order
RECIPE_KEYS = {"stages", "eval", "align"}  # a run recipe's top-level keys
# stage -> {config field: stage whose output feeds it}
INPUTS = {"sft": {"base": "pretrain"}, "reward": {"base": "sft"}, "ppo": {"policy": "sft", "reward": "reward"},
          "dpo": {"base": "sft"}, "grpo": {"base": "sft", "reward": "reward"}}
# An input not wired when the stage's options set another field instead (grpo's reward_fn replaces --reward).
INSTEAD = {("grpo", "reward"): "reward_fn"}
# Held-out metrics shown in the summary, per stage: (label, manifest key, key of the value before training).
SUMMARY = {
    "pretrain": [("held-out loss", "eval_loss", "eval_loss_initial"), ("held-out sums correct", "heldout_completion_accuracy", None)],
    "sft": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("eval loss", "eval_loss", None)],
    "reward": [("pairwise accuracy", "eval_accuracy", "eval_accuracy_initial"), ("margin", "eval_margin", None)],
    "ppo": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("RM score", "score", "score_initial"), ("KL to reference", "kl", None)],
    "grpo": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("reward", "score", "score_initial"), ("KL to reference", "kl", None)],
    "dpo": [("gold accuracy", "gold_accuracy", "gold_accuracy_initial"), ("preference accuracy", "eval_accuracy", None), ("KL to reference", "kl", None)],
}


def recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    return path / "run.yaml" if path.is_dir() else path


def eval_options(recipe: str | None) -> dict | None:
    """The recipe's `eval:` mapping (options of `llm eval`), {} when absent, None for `eval: false`."""
    if recipe is None:
        return {}
    path = recipe_path(recipe)
    spec = read_yaml(path).get("eval", {})
    if spec is False:
        return None
    if spec is None or spec is True:
        return {}
    if not isinstance(spec, dict):
        raise UsageError(f"recipe {path}: `eval:` must map `llm eval` options to values (e.g. `eval: {{problems: 200}}`) or be false")
    fixed = sorted(set(spec) & {"model", "vs", "lifecycle", "out"})
    if fixed:
        raise UsageError(f"recipe {path}: `eval:` sets {', '.join(fixed)}; `llm run` evaluates every stage of OUT into OUT/eval, so drop them")
    return dict(spec)


def load_recipe(recipe: str | None) -> list[tuple[str, str | None, dict]]:
    """[(stage, config path or None, inline options)] in run order."""
    if recipe is None:
        return [(s, None, {}) for s in DEFAULT_STAGES if s in STAGE_CONFIGS]
    path = recipe_path(recipe)
    data = read_yaml(path)
    stages = data.get("stages")
    unknown_top = sorted(set(data) - RECIPE_KEYS)
    if unknown_top:
        raise UsageError(f"recipe {path}: unknown key(s) {', '.join(unknown_top)}; a recipe holds {', '.join(f'`{k}:`' for k in sorted(RECIPE_KEYS))}")
    if not isinstance(stages, dict) or not stages:
        raise UsageError(f"recipe {path} must hold `stages:` mapping stage names to config files or options, e.g. `stages: {{pretrain: pretrain.yaml}}`")
    plan = []
    stages = choose_alignment(stages, data.get("align"), path)
    for name, spec in stages.items():
        if name not in STAGES:
            raise UsageError(f"recipe {path}: unknown stage {name!r}; stages are {', '.join(STAGES)}")
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


def choose_alignment(stages: dict, align, path: Path) -> dict:
    """The recipe's stages with its `align:` method (ppo | grpo | dpo) in the alignment slot: an alignment stage
    the recipe names is replaced by `align` with ALIGN.yaml beside the recipe (when there is one, else its
    defaults); a recipe that names none gets `align` last. Without `align:` the stages are kept as written."""
    if align is None:
        return stages
    if align not in ALIGN:
        raise UsageError(f"recipe {path}: align={align!r}; expected one of {', '.join(ALIGN)}")
    spec = f"{align}.yaml" if (path.parent / f"{align}.yaml").is_file() else None
    named = [s for s in stages if s in ALIGN]
    if len(named) > 1:
        raise UsageError(f"recipe {path}: `align: {align}` with several alignment stages ({', '.join(named)}); "
                         f"name one, or drop `align:` to run them all")
    if not named:
        return {**stages, align: spec}
    chosen = {}
    for s, v in stages.items():
        if s in ALIGN:
            chosen[align] = v if s == align else spec
        else:
            chosen[s] = v
    return chosen


def plan_from_manifest(src: str, out: Path) -> list[tuple[str, str | None, dict]]:
    """Repeat a finished run from what its manifests recorded: each stage's resolved config and seed.

    `src` is one artifact (its lifecycle.json) or a run directory holding OUT/<stage>
    artifacts. Inputs that pointed at a stage being repeated are rewired to the new
    run directory; other inputs keep the recorded path.
    """
    path = Path(src)
    if (path / artifacts.MANIFEST).is_file():
        found = [(artifacts.read_manifest(path, strict=True)["stage"], path)]
    elif path.is_dir():
        found = [(s, path / s) for s in STAGES if (path / s / artifacts.MANIFEST).is_file()]
    else:
        found = []
    if not found:
        raise UsageError(f"--from-manifest {src}: no {artifacts.MANIFEST} there or in its stage subdirectories; pass an artifact or a run directory written by `llm run`")
    repeated = {stage for stage, _ in found}
    plan = []
    for stage, d in found:
        m = artifacts.read_manifest(d, strict=True)  # a malformed manifest: one line, not a traceback
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
                  force: bool = False, from_manifest: str | None = None, evaluate: bool = True,
                  regression_margin: float = 0.05) -> None:
    import importlib

    from lifecycle.checkpoints import check_fingerprint, checkpoint_step, latest_checkpoint

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory path")
    if from_manifest and recipe:
        raise UsageError("give a recipe or --from-manifest, not both")
    plan = plan_from_manifest(from_manifest, root) if from_manifest else load_recipe(recipe)
    eval_cfg = None
    if evaluate:
        opts = eval_options(None if from_manifest else recipe)
        if opts is not None:
            from lifecycle.config import EvalConfig

            eval_cfg = build_config(EvalConfig, None, {**opts, "lifecycle": str(root), "out": str(root / "eval")})
    # Build and validate every stage's config before running any stage.
    configs = []
    for name, cfg_path, inline in plan:
        overrides = dict(inline)
        overrides["out"] = str(root / name)
        for field, src in INPUTS.get(name, {}).items():
            instead = INSTEAD.get((name, field))
            if instead and (instead in overrides or (cfg_path and read_yaml(cfg_path).get(instead))):
                continue
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
            stop_if_regressed(root, configs, name, regression_margin)
            continue
        ck = latest_checkpoint(stage_out) if hasattr(cfg, "resume") and not force else None
        if force and hasattr(cfg, "overwrite"):
            cfg.overwrite = True  # --force starts the stage afresh: its older checkpoints are replaced
        if ck is not None:
            check_fingerprint(ck, cfg, fix=f"run with the same options, or add --force to start {name} afresh")
            cfg.resume = True
            print(f"== {name}: resuming from step {checkpoint_step(ck)} ({ck})")
        else:
            print(f"== {name} -> {stage_out}")
        from lifecycle.config import check_config

        check_config(cfg)
        importlib.import_module(f"lifecycle.stages.{name}").run(cfg)
        stop_if_regressed(root, configs, name, regression_margin)
    stages = [n for n, _ in configs]
    table = summary_table(root, stages)
    print(table)
    evaluation = None
    if eval_cfg is not None:
        from lifecycle.eval import run as run_eval

        print(f"== eval: every stage on the same held-out items -> {eval_cfg.out}")
        evaluation = Path(run_eval(eval_cfg)).parent
    report = write_report(root, stages, table, evaluation)
    print(f"report: {report}")


def stop_if_regressed(root: Path, configs: list, name: str, margin: float) -> None:
    """Raise StageRegressed (after writing report.md for the stages so far) when stage `name` regressed."""
    regressed = regression(root / name, margin)
    if regressed:
        names = [n for n, _ in configs]
        done = names[: names.index(name) + 1]
        write_report(root, done, summary_table(root, done))
        later = names[names.index(name) + 1:]
        raise StageRegressed(f"{regressed}; its artifact is kept at {root / name}"
                             + (f", and {', '.join(later)} did not run" if later else "")
                             + f" (see {root / 'report.md'}); change the recipe, or pass --regression-margin -1 to go on")


def regression(stage_dir: Path, margin: float) -> str | None:
    """Why a finished stage counts as a regression on its parent, or None.

    Each stage that starts from a causal LM (sft, ppo, ...) records the held-out
    gold accuracy of its starting point (`gold_accuracy_initial`, the parent's,
    on the same prompts) and of its result (`gold_accuracy`); a drop of more
    than `margin` stops the run. A negative margin never stops.
    """
    if margin < 0:
        return None
    m = (artifacts.read_manifest(stage_dir) or {}).get("metrics", {})
    before, after = m.get("gold_accuracy_initial"), m.get("gold_accuracy")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return None
    if after < before - margin:
        return (f"{stage_dir.name} regressed: held-out gold accuracy {after:.3f} is {before - after:.3f} below its "
                f"parent's {before:.3f} (margin {margin:g})")
    return None


def eval_section(root: Path, evaluation: Path) -> list[str]:
    """report.md lines for `llm eval --lifecycle`: its table and its plots, linked relative to the run directory."""
    from lifecycle.evaluation.report import metrics_table

    res = json.loads((evaluation / "eval.json").read_text(encoding="utf-8"))
    rel = evaluation.relative_to(root) if evaluation.is_relative_to(root) else evaluation
    lines = ["## Every stage on the same held-out items (`llm eval --lifecycle`)", "",
             f"Held-out text: {res['items']['text']}." + (f" Prompts: {res['items']['prompts']}." if res["items"].get("prompts") else ""),
             "", metrics_table(res), "", f"Details, plots and the decontamination report: [{rel}/report.md]({rel}/report.md).", ""]
    for png in sorted((evaluation / "plots").glob("*.png")):
        lines += [f"![{png.stem}]({rel}/plots/{png.name})", ""]
    return lines


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
    "grpo": [("GRPO reward", ["reward", "eval_score"]), ("GRPO zero-variance groups", ["frac_reward_zero_std"]), ("GRPO gold accuracy", ["eval_gold_accuracy"])],
    "dpo": [("DPO loss", ["loss", "eval_loss"]), ("DPO preference accuracy", ["eval_rewards/accuracies"])],
}


def write_report(root: Path, stages: list[str], table: str, evaluation: Path | None = None) -> Path:
    """OUT/report.md: the summary table, `llm eval`'s table of every stage on the same items, one PNG per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Lifecycle report", "", f"Run directory: `{root}`", "",
             "Each stage's held-out metrics as it recorded them (before: its starting point; after: its result):", "", table, ""]
    if evaluation is not None:
        lines += eval_section(root, evaluation)
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
