"""`llm sweep`: Optuna over a tiny pretraining (llama-micro, a few steps, 300 world documents).

Each trial is a real run of the stage; the tests check what the study and the files say afterwards:
the pruner stops the lagging trial, a trial predicted not to fit is pruned before any model is built,
a killed sweep resumes with its finished trials kept, two workers share one SQLite study, the best
recipe loads back through `--config`, and bad space files exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lifecycle import sweep
from lifecycle.config import PretrainConfig, SweepConfig, build_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="llama-micro", seq_len=32, batch_size=8, steps=8, warmup_steps=2, min_lr=1e-6, eval_every=2,
            eval_batches=2, log_every=4, world_documents=300, vocab_size=300, save_every=0)


def _files(tmp_path: Path, params: dict, recipe: dict | None = None, **space) -> tuple[str, str]:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, **(recipe or {})}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": params, **space}))
    return str(tmp_path / "space.yaml"), str(tmp_path / "tiny.yaml")


def _study(out: Path, stage: str = "pretrain"):
    import optuna

    return optuna.load_study(study_name=f"sweep-{stage}", storage=f"sqlite:///{(out / 'study.db').resolve()}")


def _states(study) -> dict:
    return {t.number: t.state.name for t in study.trials}


def test_median_pruner_stops_the_lagging_trial_and_the_best_recipe_round_trips(tmp_path, capsys):
    space, recipe = _files(tmp_path, {"lr": {"grid": [1e-2, 3e-3, 1e-5, 3e-6]}}, sampler="grid", pruner="median",
                           pruner_startup=1)
    out = tmp_path / "sweep"
    sweep.run(SweepConfig(stage="pretrain", space=space, recipe=recipe, out=str(out), trials=4))
    study = _study(out)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(study.trials) == 4 and pruned and len(pruned) + len(complete) == 4
    for t in pruned:  # stopped at a periodic evaluation before the last step, behind the median
        assert t.params["lr"] < 1e-4
        assert max(t.intermediate_values) < 8 and t.user_attrs["pruned"].startswith("at step")
        assert not (Path(t.user_attrs["out"]) / "lifecycle.json").exists()
    for t in complete:  # a finished trial is a normal artifact; the objective is its manifest's eval_loss
        m = json.loads((Path(t.user_attrs["out"]) / "lifecycle.json").read_text())
        assert m["stage"] == "pretrain" and m["metrics"]["eval_loss"] == pytest.approx(t.value)
        assert sorted(t.intermediate_values) == [2, 4, 6, 8]
    assert {t.params["lr"] for t in complete} >= {1e-2, 3e-3}  # the good ones always finish
    best = min(complete, key=lambda t: t.value)
    assert study.best_trial.number == best.number and best.params["lr"] == 1e-2

    report = (out / "sweep.md").read_text()
    assert report.count("| pruned |") == len(pruned) and report.count("| complete |") == len(complete)
    assert (out / "plots" / "history.png").stat().st_size > 1000
    assert (out / "plots" / "objective-vs-lr.png").stat().st_size > 1000

    # best.yaml is a recipe: with --config it gives the best trial's own config (its out aside).
    trained = json.loads((Path(best.user_attrs["out"]) / "lifecycle.json").read_text())["config"]
    again = build_config(PretrainConfig, str(out / "best.yaml"), {"out": trained["out"]})
    assert again.__dict__ == trained
    from lifecycle import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _cli(cli, ["pretrain", "--config", str(out / "best.yaml"), "--out", "x", "--print-config"])
    assert e.value.code in (0, None)
    assert "lr: 0.01  #" in capsys.readouterr().out


def _cli(cli, args: list[str]) -> None:
    old = sys.argv
    sys.argv = ["llm", *args]
    try:
        cli.main()
        raise SystemExit(0)
    finally:
        sys.argv = old


def test_a_trial_predicted_not_to_fit_is_pruned_before_any_model_is_built(tmp_path, monkeypatch):
    from lifecycle import memory, modeling
    from lifecycle.stages import pretrain

    conf = modeling.model_config("llama-micro", 300, 0, 0).to_dict()
    small, big = (memory.estimate(conf, stage="pretrain", method="full", dtype="fp32", batch_size=b, seq_len=32).total_bytes
                  for b in (2, 4096))
    limit = (small + big) // 2
    built = []
    real = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", lambda c: built.append(1) or real(c))
    space, recipe = _files(tmp_path, {"batch_size": {"grid": [2, 4096]}}, sampler="grid", pruner="none")
    out = tmp_path / "sweep"
    sweep.run(SweepConfig(stage="pretrain", space=space, recipe=recipe, out=str(out), trials=2, gpu_memory=f"{limit}B"))
    by_batch = {t.params["batch_size"]: t for t in _study(out).trials}
    assert by_batch[2].state.name == "COMPLETE"
    assert by_batch[4096].state.name == "PRUNED" and by_batch[4096].user_attrs["pruned"].startswith("memory: pretrain needs")
    assert not by_batch[4096].intermediate_values and not Path(by_batch[4096].user_attrs["out"]).exists()
    assert len(built) == 1  # only the trial that fits built a model
    assert "| pruned (memory) |" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_its_finished_trials_kept(tmp_path):
    space, recipe = _files(tmp_path, {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, sampler="random", pruner="none",
                           recipe={"steps": 40, "eval_every": 10, "save_every": 5})
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "lifecycle", "sweep", "pretrain", "--space", space, "--config", recipe, "--out", str(out),
            "--trials", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill it while a trial runs, after one has finished
            time.sleep(0.5)
            if (out / "study.db").exists():
                states = list(_states(_study(out)).values()) if _has_study(out) else []
                if states.count("COMPLETE") >= 1 and "RUNNING" in states:
                    break
        else:
            pytest.fail("the sweep never got past its first trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.state.name, t.params, t.value) for t in _study(out).trials}
    killed = [n for n, (s, _, _) in before.items() if s == "RUNNING"]
    assert len(killed) == 1

    sweep.run(SweepConfig(stage="pretrain", space=space, recipe=recipe, out=str(out), trials=3))
    after = _study(out).trials
    for n, (state, params, value) in before.items():  # finished trials are kept as they were
        if state == "COMPLETE":
            assert (after[n].state.name, after[n].params, after[n].value) == (state, params, value)
    assert after[killed[0]].state.name == "FAIL"
    retry = [t for t in after if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == before[killed[0]][1]  # the same configuration, finished in its own directory
    assert retry[0].user_attrs["out"] == after[killed[0]].user_attrs["out"]
    assert sum(t.state.name == "COMPLETE" for t in after) == 3
    assert "continued by trial" in (out / "sweep.md").read_text()


def _has_study(out: Path) -> bool:
    import optuna

    try:
        return bool(optuna.get_all_study_names(f"sqlite:///{(out / 'study.db').resolve()}"))
    except Exception:  # the database is being created by the other process
        return False


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    space, recipe = _files(tmp_path, {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, sampler="random", pruner="none",
                           recipe={"steps": 20, "eval_every": 10})
    out = tmp_path / "sweep"
    sweep.run(SweepConfig(stage="pretrain", space=space, recipe=recipe, out=str(out), trials=4, workers=2))
    trials = _study(out).trials
    assert len(trials) >= 4 and all(t.state.name == "COMPLETE" for t in trials)  # a race may add one more
    assert len({t.user_attrs["out"] for t in trials}) == len(trials)  # distinct trials, each its own artifact
    assert len({t.params["lr"] for t in trials}) == len(trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    for t in trials:
        assert (Path(t.user_attrs["out"]) / "lifecycle.json").is_file()


@pytest.mark.parametrize("space_text, expected", [
    ("params: {learning_rate: {low: 1e-4, high: 1e-2}}", "'learning_rate' is not an option of pretrain that a sweep can set; valid fields: seed, steps"),
    ("params: {batch_size: {low: 0.5, high: 4}}", "batch_size: expected an integer, got 0.5"),
    ("params: {batch_size: {choices: [8, many]}}", "batch_size: expected an integer, got 'many'"),
    ("params: {lr: {low: 1e-2, high: 1e-3, log: true}}", "lr: empty range: low 0.01 is not below high 0.001"),
    ("params: {lr: {choices: []}}", "lr: the list of values is empty"),
    ("params: {lr: {low: 1e-3, high: 1e-2}}\nobjective: accuracy", "unknown objective 'accuracy' for pretrain; valid metrics: eval_loss, eval_ppl"),
    ("params: {lr: {low: 1e-3, high: 1e-2}}\nsampler: grid", "the grid sampler needs a list of values for every option; lr is a range"),
    ("params: {lr: {low: 1e-5, high: 1e-2, log: true}}", "with lr=1e-05: invalid config: min_lr=0.0003; must lie in [0, lr]"),
])
def test_bad_space_exits_2_with_one_line(tmp_path, capsys, space_text, expected):
    from lifecycle import cli

    (tmp_path / "space.yaml").write_text(space_text + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _cli(cli, ["sweep", "pretrain", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "s").exists()  # nothing written


def test_bad_sweep_options_exit_2(tmp_path, capsys):
    from lifecycle import cli

    (tmp_path / "space.yaml").write_text("params: {lr: {low: 1e-3, high: 1e-2}}\n")
    for args, expected in ((["sweep", "data", "--space", "x", "--out", "o"], "stage 'data' cannot be swept; expected one of pretrain"),
                           (["sweep", "pretrain", "--space", str(tmp_path / "space.yaml"), "--out", "o", "--workers", "0"], "workers=0"),
                           (["sweep", "pretrain", "--space", str(tmp_path / "space.yaml"), "--out", "o", "--gpu-memory", "lots"], "--gpu-memory lots")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            _cli(cli, args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_every_sweepable_stage_names_its_metrics():
    """Each stage a sweep accepts has objectives, the first being the held-out metric its manifest records."""
    from lifecycle.config import STAGE_CONFIGS

    assert set(sweep.METRICS) == set(STAGE_CONFIGS)
    assert next(iter(sweep.METRICS["dpo"])) == "gold_accuracy" and next(iter(sweep.METRICS["grpo"])) == "gold_accuracy"


def test_report_hook_is_a_no_op_outside_a_sweep():
    assert not sweep.active()
    sweep.report_eval(10, 100, {"eval_loss": 1.0})  # nothing to report to: returns
    seen = []
    with sweep.reporting(lambda *a: seen.append(a)):
        assert sweep.active()
        sweep.report_eval(10, 100, {"eval_loss": 1.0})
    assert seen == [(10, 100, {"eval_loss": 1.0})] and not sweep.active()


def test_shipped_space_files_load():
    paths = sorted([*(ROOT / "recipes").rglob("sweep-*.yaml"), *(ROOT / "examples").glob("sweep-*.yaml")])
    assert paths
    for path in paths:
        stage = path.stem.removeprefix("sweep-")
        cfg = SweepConfig(stage=stage, space=str(path), out="/tmp/sweep-check")
        space = sweep.check(cfg)
        assert space.params and space.objective in sweep.METRICS[stage]


def test_ppo_reports_its_periodic_held_out_metrics_to_a_trial(tiny_base, tmp_path_factory, tiny_tokenizer, tmp_path):
    """A PPO trial can be pruned: each periodic evaluation hands the trial the manifest's own metric names,
    and the last report equals what the manifest records (so the pruner and the objective read one number)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.config import PPOConfig
    from lifecycle.modeling import model_config
    from lifecycle.stages import ppo

    torch.manual_seed(1)
    rc = model_config("llama-micro", len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    rc.num_labels = 1
    reward = tmp_path_factory.mktemp("sweep_rm")
    save_model_artifact(AutoModelForSequenceClassification.from_config(rc), tiny_tokenizer, reward, stage="reward",
                        config={}, metrics={"eval_accuracy": 0.9}, parent=None, seed=0)
    out = tmp_path / "ppo"
    cfg = build_config(PPOConfig, None, dict(policy=str(tiny_base), reward=str(reward), out=str(out), max_steps=2,
                                             eval_every=1, prompts_per_rollout=4, minibatch_size=4, micro_batch_size=4,
                                             ppo_epochs=1, world_prompts=16, eval_prompts=4, gate_samples=4, save_every=0))
    reports = []
    with sweep.reporting(lambda step, total, metrics: reports.append((step, total, dict(metrics)))):
        ppo.run(cfg)
    assert [(s, t) for s, t, _ in reports] == [(1, 2), (2, 2)]
    assert all(set(m) <= set(sweep.METRICS["ppo"]) and {"score", "kl"} <= set(m) for _, _, m in reports)
    final = json.loads((out / "lifecycle.json").read_text())["metrics"]
    assert reports[-1][2]["score"] == pytest.approx(final["score"]) and reports[-1][2]["kl"] == pytest.approx(final["kl"])
    if "gold_accuracy" in final:
        assert reports[-1][2]["gold_accuracy"] == pytest.approx(final["gold_accuracy"])
