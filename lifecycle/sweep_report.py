"""`llm sweep`'s results (part 5 of lifecycle/sweep.py, which calls `write_results`): OUT/sweep.md with every trial, OUT/best.yaml (a
recipe `llm <stage> --config` takes) and OUT/plots, drawn by Optuna's matplotlib module.

Optuna and matplotlib are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from typing import TYPE_CHECKING

from lifecycle import artifacts
from lifecycle.config import SweepConfig

if TYPE_CHECKING:  # for annotations only: lifecycle.sweep imports this module, never the other way
    from lifecycle.sweep import Space


def show(v: Any) -> str:
    """A searched value as the report and the trial lines print it."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _state(t) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.PRUNED:
        why = t.user_attrs.get("pruned", "")
        return "pruned (memory)" if why.startswith("memory") else "pruned"
    if t.state == TrialState.FAIL:
        return "interrupted" if t.user_attrs.get("interrupted") else "failed"
    return t.state.name.lower()


def write_results(cfg: SweepConfig, space: Space, study, storage: str, recipe_of: Callable[[dict], dict]) -> Path:
    """OUT/sweep.md (every trial), OUT/best.yaml (`recipe_of(best params)`) and OUT/plots/*.png; `storage` is
    the study's URL, named in the report."""
    from optuna.trial import TrialState

    root = Path(cfg.out)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    names = list(space.params)
    continued = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    lines = [f"# Sweep: `llm {space.stage}`, study `{study.study_name}`", "",
             f"Objective: {space.direction} `{space.objective}`; sampler {space.sampler}, pruner {space.pruner}; "
             f"storage `{storage}`.", "",
             f"{len(complete)} complete, {sum(t.state == TrialState.PRUNED for t in trials)} pruned "
             f"({sum(_state(t) == 'pruned (memory)' for t in trials)} before starting: predicted not to fit), "
             f"{sum(t.state == TrialState.FAIL for t in trials)} failed or interrupted, of {len(trials)} trials.", ""]
    head = ["trial", "state", space.objective, *names, "steps reported", "seconds", "directory", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        note = t.user_attrs.get("pruned", "")
        if "retry_of" in t.user_attrs:
            note = (note + "; " if note else "") + f"continues trial {t.user_attrs['retry_of']}"
        if t.number in continued:
            note = (note + "; " if note else "") + f"stopped unfinished; continued by trial {continued[t.number]}"
        row = [str(t.number), _state(t), "-" if value is None else f"{value:.4g}" + ("" if t.value is not None else " (last report)"),
               *[show(t.params[n]) if n in t.params else "-" for n in names],
               str(max(t.intermediate_values)) if t.intermediate_values else "-",
               "-" if secs is None else f"{secs:.0f}", f"`{Path(t.user_attrs.get('out', '-')).name}`", note.replace("|", "/")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if complete:
        best = study.best_trial
        recipe = recipe_of(best.params)
        header = (f"# Best of {len(complete)} complete trials of `llm sweep {space.stage}` (study {study.study_name}): "
                  f"trial {best.number}, {space.objective} {best.value:.6g}.\n"
                  f"# Train it in full:  llm {space.stage} --config {root / 'best.yaml'} --out DIR\n"
                  + (f"# The sweep shortened each trial with {_flow(space.budget)}; those options are left out here.\n" if space.budget else ""))
        artifacts.atomic_write_text(root / "best.yaml", header + yaml.safe_dump(recipe, sort_keys=False))
        lines += [f"## Best: trial {best.number}, {space.objective} = {best.value:.6g}", "",
                  "```", *[f"{k}: {show(v)}" for k, v in best.params.items()], "```", "",
                  f"Recipe: `best.yaml` (`llm {space.stage} --config {root / 'best.yaml'} --out DIR`); the trial's artifact: "
                  f"`{best.user_attrs.get('out')}`.", ""]
    lines += _plots(root, study, space, complete)
    path = root / "sweep.md"
    artifacts.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _flow(d: dict) -> str:
    return ", ".join(f"{k}={show(v)}" for k, v in d.items())


def _plots(root: Path, study, space: Space, complete: list) -> list[str]:
    """Optimisation history, parameter importances (two or more searched options, three or more complete
    trials) and the objective against the most important option, drawn by Optuna's matplotlib module."""
    if not complete:
        return []
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = ["## Plots", ""]
    names = list(space.params)
    top = names[0]
    drawn: list[tuple[str, str, Callable[[], Any]]] = [("history.png", "optimisation history", lambda: vis.plot_optimization_history(study))]
    if len(names) >= 2 and len(complete) >= 3:
        try:
            importances = optuna.importance.get_param_importances(study)
            top = next(iter(importances))
            drawn.append(("importances.png", "parameter importances", lambda: vis.plot_param_importances(study)))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
    drawn.append((f"objective-vs-{top}.png", f"{space.objective} against {top}", lambda: vis.plot_slice(study, params=[top])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib module experimental
        for fname, title, draw in drawn:
            try:
                ax = draw()
            except (RuntimeError, ValueError, ZeroDivisionError):
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(6, 4)
            fig.tight_layout()
            fig.savefig(plots / fname, dpi=100)
            plt.close(fig)
            lines += [f"![{title}](plots/{fname})", ""]
    return lines
