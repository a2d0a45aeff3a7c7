"""`llm sweep`: run one stage many times under Optuna and keep the best configuration.

    llm sweep pretrain --space recipes/sweeps/pretrain-default.yaml --out runs/sweep

Read top to bottom:
  1. the hook the stage loops call at each periodic held-out evaluation (`report_eval`)
  2. the search space file: parsed and checked before any trial runs (all problems in one line)
  3. one trial: sample options -> stage config -> memory estimate (prune what will not fit,
     before any weights exist) -> `stage.run(cfg)` in OUT/trial-N -> the objective from its manifest
  4. workers: each process loads the study from the storage and runs trials until the study holds
     `trials` finished or running ones; a trial left RUNNING by a killed process is failed and
     queued again (it resumes from its own checkpoints)
  5. results: OUT/sweep.md, OUT/best.yaml (a recipe `llm <stage> --config` takes), OUT/plots,
     written by lifecycle/sweep_report.py

The search itself (samplers, pruners, storage, several machines on one database) is Optuna's; this
module only maps our configs and artifacts onto it. Optuna is imported inside the functions, so
importing this module (the stages do, for the hook) costs nothing.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lifecycle import artifacts
from lifecycle.config import STAGE_CONFIGS, SweepConfig, _coerce, build_config, check_config, field_types, read_yaml
from lifecycle.errors import Interrupted, UsageError
from lifecycle.sweep_report import show, write_results


# ---------------------------------------------------------------------------
# 1. The hook the stage loops call (a no-op unless a sweep runs a trial in this process)
# ---------------------------------------------------------------------------
_reporter: Callable[[int, int, dict], None] | None = None


def report_eval(step: int, total: int, metrics: dict) -> None:
    """Called by a stage at each periodic held-out evaluation with that evaluation's metrics.

    Outside a sweep it does nothing. Inside one, it passes the objective's value to the trial,
    and raises optuna.TrialPruned when the pruner says the trial lags behind the others.
    """
    if _reporter is not None:
        _reporter(step, total, metrics)


def active() -> bool:
    """Whether a sweep trial runs in this process (the TRL stages add their reporting callback only then)."""
    return _reporter is not None


@contextmanager
def reporting(fn: Callable[[int, int, dict], None]) -> Iterator[None]:
    global _reporter
    _reporter = fn
    try:
        yield
    finally:
        _reporter = None


# ---------------------------------------------------------------------------
# 2. The search space
# ---------------------------------------------------------------------------
# What each stage records in its manifest's metrics that a sweep can optimise, with the direction
# that is better; the first is the default objective (the stage's held-out metric).
METRICS: dict[str, dict[str, str]] = {
    "pretrain": {"eval_loss": "minimize", "eval_ppl": "minimize", "eval_loss_drop": "maximize",
                 "heldout_completion_accuracy": "maximize", "tokens_per_second": "maximize", "train_seconds": "minimize"},
    "sft": {"eval_loss": "minimize", "gold_accuracy": "maximize", "gold_accuracy_carry": "maximize",
            "gold_accuracy_nocarry": "maximize", "train_seconds": "minimize"},
    "reward": {"eval_accuracy": "maximize", "eval_margin": "maximize", "train_seconds": "minimize"},
    "ppo": {"score": "maximize", "gold_accuracy": "maximize", "kl": "minimize", "train_seconds": "minimize"},
    "dpo": {"gold_accuracy": "maximize", "eval_accuracy": "maximize", "eval_margin": "maximize", "eval_loss": "minimize",
            "kl": "minimize", "train_seconds": "minimize"},
    "grpo": {"gold_accuracy": "maximize", "score": "maximize", "kl": "minimize", "train_seconds": "minimize"},
}
SPACE_KEYS = ("params", "objective", "direction", "fixed", "budget", "trials", "sampler", "pruner", "pruner_startup", "stage")
NOT_SEARCHABLE = ("out", "resume")


@dataclass
class Param:
    """One searched option: a range (int or float, optionally log-scaled, with a step) or a list of values."""

    name: str
    kind: str  # "int" | "float" | "choice"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list = field(default_factory=list)


@dataclass
class Space:
    """A checked space file."""

    stage: str
    params: dict
    objective: str
    direction: str
    fixed: dict
    budget: dict
    trials: int
    sampler: str
    pruner: str
    pruner_startup: int


def load_space(path: str, stage: str, cfg: SweepConfig | None = None) -> Space:
    """Read and check a space file; one UsageError naming every problem (valid fields, metrics, ranges)."""
    data = read_yaml(path)
    cls = STAGE_CONFIGS[stage]
    types = field_types(cls)
    problems: list[str] = []
    unknown_keys = sorted(k for k in data if k not in SPACE_KEYS)
    if unknown_keys:
        problems.append(f"unknown key(s) {', '.join(unknown_keys)}; a space file holds {', '.join(SPACE_KEYS)}")
    if data.get("stage", stage) != stage:
        problems.append(f"it is a space for {data['stage']!r}, not {stage!r}")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        problems.append("`params:` must map the options to search to their ranges, e.g. `lr: {low: 1e-4, high: 1e-2, log: true}`")
        raw = {}
    valid = ", ".join(n for n in types if n not in NOT_SEARCHABLE)
    params: dict[str, Param] = {}
    for where in ("fixed", "budget"):
        if not isinstance(data.get(where) or {}, dict):
            problems.append(f"`{where}:` must map options to values")
    fixed, budget = dict(data.get("fixed") or {}), dict(data.get("budget") or {})
    for name in sorted(set(raw) | set(fixed if isinstance(fixed, dict) else {}) | set(budget if isinstance(budget, dict) else {})):
        if name not in types or name in NOT_SEARCHABLE:
            problems.append(f"{name!r} is not an option of {stage} that a sweep can set; valid fields: {valid}")
    for name, spec in raw.items():
        if name in types and name not in NOT_SEARCHABLE:
            try:
                params[name] = _param(name, spec, types[name])
            except ValueError as e:
                problems.append(f"{name}: {e}")
    both = sorted(set(params) & (set(fixed) | set(budget)))
    if both:
        problems.append(f"{', '.join(both)} both searched and fixed; keep each option in one place")
    metrics = METRICS[stage]
    objective = data.get("objective", next(iter(metrics)))
    if objective not in metrics:
        problems.append(f"unknown objective {objective!r} for {stage}; valid metrics: {', '.join(metrics)}")
    direction = data.get("direction", metrics.get(objective, "minimize"))
    if direction not in ("minimize", "maximize"):
        problems.append(f"direction {direction!r}; expected minimize or maximize")
    sampler = (cfg.sampler if cfg and cfg.sampler else None) or data.get("sampler", "tpe")
    pruner = (cfg.pruner if cfg and cfg.pruner else None) or data.get("pruner", "median")
    if sampler not in ("tpe", "random", "grid"):
        problems.append(f"sampler {sampler!r}; expected tpe, random or grid")
    elif sampler == "grid":
        ranged = [p.name for p in params.values() if p.kind != "choice"]
        if ranged:
            problems.append(f"the grid sampler needs a list of values for every option; {', '.join(ranged)} "
                            f"{'is a range' if len(ranged) == 1 else 'are ranges'}: write `grid: [...]` or use tpe/random")
    if pruner not in ("median", "halving", "none"):
        problems.append(f"pruner {pruner!r}; expected median, halving or none")
    trials = (cfg.trials if cfg and cfg.trials else 0) or data.get("trials", 20)
    startup = data.get("pruner_startup", 2)
    for key, value in (("trials", trials), ("pruner_startup", startup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "trials" else 0):
            problems.append(f"{key} {value!r}; expected an integer >= {1 if key == 'trials' else 0}")
    if problems:
        raise UsageError(f"space file {path}: " + "; ".join(problems))
    return Space(stage, params, objective, direction, fixed, budget, trials, sampler, pruner, startup)


def _param(name: str, spec: Any, typ: Any) -> Param:
    """One entry of `params:`; ValueError with the reason (a wrong type, an empty range)."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"expected a range {{low, high[, log, step]}} or a list of values ({{choices: [...]}} or "
                         f"{{grid: [...]}}), got {spec!r}; a single value belongs under `fixed:`")
    values = spec.get("choices", spec.get("grid"))
    allowed = {"choices", "grid", "type"} if values is not None else {"low", "high", "log", "step", "type"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ValueError(f"unexpected key(s) {', '.join(extra)}; a range takes low, high, log, step; a list takes choices or grid")
    kind = {int: "int", float: "float"}.get(typ, "other")
    if values is not None:
        if not isinstance(values, list) or not values:
            raise ValueError("the list of values is empty; give at least one value")
        return Param(name, "choice", choices=[_coerce(name, v, typ) for v in values])
    if kind == "other":
        raise ValueError(f"a range needs a number option, and {name} is not one; list its values with choices: [...]")
    if spec.get("type", kind) != kind:
        raise ValueError(f"type {spec['type']!r} does not match the option, which takes {'an integer' if kind == 'int' else 'a number'}")
    if "low" not in spec or "high" not in spec:
        raise ValueError("a range needs both low and high")
    low, high = _coerce(name, spec["low"], typ), _coerce(name, spec["high"], typ)
    log = _coerce(name, spec.get("log", False), bool)
    step = _coerce(name, spec["step"], typ) if spec.get("step") is not None else None
    if not low < high:
        raise ValueError(f"empty range: low {low} is not below high {high}")
    if log and low <= 0:
        raise ValueError(f"a log-scaled range needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("log and step cannot be combined (Optuna samples a log range without steps)")
    if step is not None and step <= 0:
        raise ValueError(f"step {step}; must be positive")
    return Param(name, kind, low, high, log, step)


def _suggest(trial, p: Param) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.name, p.choices)
    if p.kind == "int":
        return trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


def _corners(space: Space) -> Iterator[dict]:
    """Each option at each end of its range (or each of its values), the others at their low end:
    the configurations checked before the first trial, so a bad bound fails at once."""
    base = {n: (p.choices[0] if p.kind == "choice" else p.low) for n, p in space.params.items()}
    yield base
    for n, p in space.params.items():
        for v in (p.choices[1:] if p.kind == "choice" else [p.high]):
            yield {**base, n: v}


def trial_config(cfg: SweepConfig, space: Space, params: dict, out: Path):
    """The stage config of one trial: the recipe <- the space's fixed and budget options <- the sampled ones."""
    return build_config(STAGE_CONFIGS[space.stage], cfg.recipe or None,
                        {**space.fixed, **space.budget, **params, "out": str(out)})


# ---------------------------------------------------------------------------
# 3. One trial
# ---------------------------------------------------------------------------
def predicted_fit(stage: str, cfg: Any, device_bytes: int | None) -> str | None:
    """None when the trial should fit the GPU, else the reason it will not (the memory estimate's line).

    Uses the same estimate every stage consults before loading weights; a model the
    estimator cannot describe, or a base given as a hub id, is let through.
    """
    import json

    from lifecycle import training

    if stage == "pretrain":
        from lifecycle.modeling import model_config

        model = model_config(cfg.model, cfg.vocab_size, 0, 0).to_dict()  # a config only: no weights
    else:
        base = getattr(cfg, "base", "") or getattr(cfg, "policy", "")
        try:
            model = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
    ppo = stage == "ppo"  # its episodes per forward/backward, and no seq_len/max_length of its own
    try:
        training.check_memory(cfg, model, stage, batch_size=cfg.micro_batch_size if ppo else None,
                              seq_len=2048 if ppo else None, device_bytes=device_bytes, force=False)
    except UsageError as e:
        return str(e).removesuffix("; pass --force to try anyway")
    return None


class Objective:
    """Optuna's objective: one trial = one run of the stage in its own artifact directory."""

    def __init__(self, cfg: SweepConfig, space: Space, device_bytes: int | None):
        self.cfg, self.space, self.device_bytes = cfg, space, device_bytes
        self.root = Path(cfg.out)

    def __call__(self, trial) -> float:
        import importlib

        import optuna

        from lifecycle.checkpoints import latest_checkpoint

        sp = self.space
        params = {n: _suggest(trial, p) for n, p in sp.params.items()}
        retry_dir = trial.user_attrs.get("resume_dir")  # a trial an earlier process left unfinished
        out = Path(retry_dir) if retry_dir else self.root / f"trial-{trial.number}"
        trial.set_user_attr("out", str(out))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        cfg = trial_config(self.cfg, sp, params, out)
        # Memory first: a trial that will not fit is pruned before anything is loaded.
        reason = predicted_fit(sp.stage, cfg, self.device_bytes)
        if reason is not None:
            trial.set_user_attr("pruned", f"memory: {reason}")
            print(f"trial {trial.number}: pruned before it starts: {reason}", flush=True)
            raise optuna.TrialPruned(reason)
        if retry_dir and latest_checkpoint(out) is not None and hasattr(cfg, "resume"):
            cfg.resume = True
            check_config(cfg)
        print(f"== trial {trial.number} -> {out}: " + ", ".join(f"{k}={show(v)}" for k, v in params.items()), flush=True)
        stage = importlib.import_module(f"lifecycle.stages.{sp.stage}")
        try:
            with reporting(lambda step, total, metrics: self._report(trial, step, total, metrics)):
                stage.run(cfg)
        except Interrupted:
            trial.set_user_attr("interrupted", True)
            raise
        metrics = (artifacts.read_manifest(out) or {}).get("metrics", {})
        value = metrics.get(sp.objective)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            have = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise UsageError(f"trial {trial.number} recorded no {sp.objective!r} (this data has no such metric); "
                             f"pick an objective among: {have}")
        return float(value)

    def _report(self, trial, step: int, total: int, metrics: dict) -> None:
        import optuna

        value = metrics.get(self.space.objective)
        if step <= 0 or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        trial.report(float(value), step)
        if step < total and trial.should_prune():  # a finished run is judged by its final value
            trial.set_user_attr("pruned", f"at step {step}/{total}: {self.space.objective} {value:.4g}")
            print(f"trial {trial.number}: pruned at step {step}/{total} ({self.space.objective} {value:.4g})", flush=True)
            raise optuna.TrialPruned(f"step {step}")


# ---------------------------------------------------------------------------
# 4. Study, workers, resuming
# ---------------------------------------------------------------------------
def storage_url(cfg: SweepConfig) -> str:
    return cfg.storage or f"sqlite:///{(Path(cfg.out) / 'study.db').resolve()}"


def _storage(url: str):
    import optuna

    if url.startswith("sqlite:"):  # several processes write to one file: wait for the lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return optuna.storages.RDBStorage(url)


def _sampler(space: Space, seed: int):
    import optuna

    if space.sampler == "grid":
        return optuna.samplers.GridSampler({n: p.choices for n, p in space.params.items()}, seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE's default is 10 random trials before it models anything: too many for a 10-trial sweep.
    # constant_liar keeps parallel workers from proposing the same point.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, space.trials // 3)), constant_liar=True)


def _pruner(space: Space):
    import optuna

    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=space.pruner_startup, n_warmup_steps=0)
    if space.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: SweepConfig, space: Space, seed: int):
    import optuna

    name = cfg.study or f"sweep-{space.stage}"
    study = optuna.create_study(storage=_storage(storage_url(cfg)), study_name=name, load_if_exists=True,
                                direction=space.direction, sampler=_sampler(space, seed), pruner=_pruner(space))
    if study.direction.name.lower() != space.direction:
        raise UsageError(f"study {name!r} in {storage_url(cfg)} was created to {study.direction.name.lower()}, "
                         f"the space says {space.direction}; pass another --study or --out")
    return study


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study) -> list[int]:
    """Fail the trials a dead process on this machine left RUNNING (or stopped with Ctrl-C), and queue
    their parameters again, so the rerun finishes them (in the same directory, from its checkpoints).
    Trials run by live processes, or on other machines, are left alone. Returns the requeued numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    requeued = []
    for t in trials:
        dead = t.state == TrialState.RUNNING and t.user_attrs.get("host") == host and not _alive(t.user_attrs.get("pid"))
        stopped = t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
        if (dead or stopped) and t.number not in retried and t.user_attrs.get("out"):
            if dead:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "resume_dir": t.user_attrs["out"]})
            requeued.append(t.number)
    return requeued


def _counted(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))


def run_worker(cfg: SweepConfig, index: int = 0) -> None:
    """One worker: run trials of the study until it holds `trials` finished or running ones."""
    from optuna.trial import TrialState

    space = load_space(cfg.space, cfg.stage, cfg)
    device_bytes = _device_bytes(cfg)
    if cfg.workers > 1:
        _share_cores(cfg.workers)
    probe = open_study(cfg, space, cfg.seed)
    # A fresh seed per worker and per restart: equal seeds would propose equal points.
    study = open_study(cfg, space, cfg.seed + 7919 * len(probe.trials) + 104729 * index)
    objective = Objective(cfg, space, device_bytes)
    while _counted(study) < space.trials:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if space.sampler == "grid" and not waiting and study.sampler.is_exhausted(study):
            break
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True)


def _share_cores(workers: int) -> None:
    """On a machine without CUDA, split the cores between the workers (torch would give each all of them)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _device_bytes(cfg: SweepConfig) -> int | None:
    if cfg.gpu_memory is None:
        return None  # check_fits asks the CUDA device; no verdict on CPU
    from lifecycle.memory import parse_size

    try:
        return parse_size(cfg.gpu_memory)
    except UsageError as e:
        raise UsageError(f"--gpu-memory {cfg.gpu_memory}: {e}") from None


def check(cfg: SweepConfig) -> Space:
    """Everything that can be checked before the first trial: the options, the space, every bound's config."""
    check_config(cfg)
    if cfg.recipe:
        read_yaml(cfg.recipe)
    space = load_space(cfg.space, cfg.stage, cfg)
    _device_bytes(cfg)
    probe = Path(cfg.out) / "trial-check"
    for params in _corners(space):
        try:
            trial_config(cfg, space, params, probe)
        except UsageError as e:
            shown = ", ".join(f"{k}={show(v)}" for k, v in params.items())
            raise UsageError(f"space file {cfg.space}: with {shown}: {e}") from None
    return space


def run(cfg: SweepConfig) -> Path:
    """`llm sweep`: check everything, run the workers, write the results."""
    import optuna

    space = check(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    study = open_study(cfg, space, cfg.seed)
    requeued = recover(study)
    done = _counted(study)
    print(f"sweep: study {study.study_name!r} in {storage_url(cfg)}: {len(study.trials)} trial(s) so far"
          + (f", {len(requeued)} unfinished one(s) queued again ({', '.join(map(str, requeued))})" if requeued else "")
          + f"; running until {space.trials} ({max(0, space.trials - done)} to go) with {cfg.workers} worker(s)", flush=True)
    try:
        if cfg.workers == 1:
            run_worker(cfg)
        else:
            _run_processes(cfg)
    finally:
        if study.trials:
            path = write_results(cfg, space, open_study(cfg, space, cfg.seed), storage_url(cfg),
                                 lambda params: best_recipe(cfg, space, params))
            print(f"sweep: wrote {path}", flush=True)
    return root


def _run_processes(cfg: SweepConfig) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: no torch or storage state copied from this one
    procs = [ctx.Process(target=run_worker, args=(cfg, i), name=f"sweep-worker-{i}") for i in range(cfg.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if failed:
        raise UsageError(f"worker(s) {', '.join(failed)} stopped with an error (see their lines above); "
                         f"rerun the same command to finish the sweep")


# ---------------------------------------------------------------------------
# 5. Results (the report itself: lifecycle/sweep_report.py)
# ---------------------------------------------------------------------------
def best_recipe(cfg: SweepConfig, space: Space, params: dict) -> dict:
    """The best trial's options as a stage recipe: the base recipe, the space's fixed options, the best values.
    The `budget:` options (what made a trial shorter than a real run) are left out."""
    recipe = dict(read_yaml(cfg.recipe)) if cfg.recipe else {}
    recipe.update(space.fixed)
    recipe.update(params)
    for k in NOT_SEARCHABLE:
        recipe.pop(k, None)
    return recipe
