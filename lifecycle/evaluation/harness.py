"""lm-evaluation-harness through its Python API, on a model `llm eval` has loaded (plain or base + LoRA adapter).

We write no harness of our own: the tasks, prompts, few-shot sampling and metrics
are lm-eval's. What is ours: checking the task names first (an unknown task, or a
hub task on an offline machine, is one line and exit 2 before any model loads),
and handing the harness our loaded model and tokenizer (`HFLM(pretrained=model)`),
so an adapter directory and our attention choices apply as everywhere else.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lifecycle.config import EvalConfig
from lifecycle.errors import UsageError
from lifecycle.evaluation import Loaded
from lifecycle.training import say


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_local_dataset(task_cfg: dict) -> bool:
    """A task whose data is on this machine: a file builder (json/csv/...) over local files, or a local directory."""
    path = str(task_cfg.get("dataset_path") or "")
    if path in ("json", "csv", "parquet", "text", "arrow"):
        return True
    return bool(path) and Path(path).expanduser().exists()


def task_manager(cfg: EvalConfig, TaskManager) -> tuple[Any, list[str]]:
    """lm-eval's task index (with --task-dir) and the task names, after checking each is known and, offline, local."""
    tasks = [t for t in cfg.tasks for t in t.split(",") if t]
    if cfg.task_dir and not Path(cfg.task_dir).is_dir():
        raise UsageError(f"--task-dir {cfg.task_dir} is not a directory; pass the directory holding your task YAML files")
    tm = _task_index(TaskManager, str(Path(cfg.task_dir).resolve()) if cfg.task_dir else None)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in --task-dir {cfg.task_dir}" if cfg.task_dir else "; add --task-dir DIR for tasks of your own"
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's {len(known)} tasks{where}")
    if _hub_offline():
        remote = []
        for t in tasks:
            entry = tm.task_index.get(t)
            kind = getattr(getattr(entry, "kind", None), "name", "")
            if kind != "TASK" or not _is_local_dataset(getattr(entry, "cfg", None) or {}):
                remote.append(t)  # a group or tag (its members fetch their own data), or a task over a hub dataset
        if remote:
            raise UsageError(f"lm-eval task(s) {', '.join(remote)} download their datasets from the Hugging Face Hub, and "
                             f"this machine is offline (HF_HUB_OFFLINE); run online, or use a local task with --task-dir")
    return tm, tasks


def harness(m: Loaded, cfg: EvalConfig) -> dict:
    """Run lm-eval's tasks on the loaded model; {task: {metric: value}} with the harness's own metric names."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm, tasks = task_manager(cfg, TaskManager)
    say(f"eval: lm-eval {', '.join(tasks)} on {m.name}" + (f" (adapter {m.adapter})" if m.adapter else ""))
    lm = HFLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=cfg.batch_size, max_length=_context(m.model))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=cfg.limit or None,
                                      num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, OSError) as e:  # the hub unreachable while fetching a dataset
        raise UsageError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}); check the network, or use a local task with --task-dir") from None
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        out[task]["n"] = (res.get("n-samples", {}).get(task) or {}).get("effective")
        out[task]["num_fewshot"] = (res.get("n-shot") or {}).get(task)
    return out


def task_items(cfg: EvalConfig) -> list[str]:
    """The text of local lm-eval tasks' items (every string field of each row), for the decontamination check."""
    if not cfg.task_dir:
        return []
    import yaml

    from lifecycle.data.files import read_records

    texts = []
    for y in sorted(Path(cfg.task_dir).rglob("*.y*ml")):
        try:
            tcfg = yaml.safe_load(y.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        files = ((tcfg.get("dataset_kwargs") or {}).get("data_files")) or {}
        for f in (files.values() if isinstance(files, dict) else [files]):
            for f1 in (f if isinstance(f, list) else [f]):
                p = Path(f1) if Path(f1).is_absolute() else y.parent / f1
                if p.is_file():
                    texts += [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in read_records(str(p))]
    return texts



def _context(model) -> int:
    from lifecycle.modeling import context_length

    return context_length(model.config)


@functools.lru_cache(maxsize=4)
def _task_index(TaskManager, include_path: str | None):
    """lm-eval's index of its tasks (and ours): it reads thousands of YAML files, so it is built once per process."""
    return TaskManager(include_path=include_path)
