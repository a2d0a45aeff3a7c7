"""Configs: defaults <- recipe YAML <- flags; every problem reported at once; every shipped recipe loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lifecycle.config import STAGE_CONFIGS, DataConfig, PretrainConfig, build_config, dump_yaml, parse_set
from lifecycle.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lr: 3e-4\nsteps: 7\nmodel: gpt2-tiny\n")  # PyYAML reads 3e-4 as a string: accepted as a float
    cfg = build_config(PretrainConfig, str(y), {"out": "x", "steps": 9})
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.steps == 9  # flag beats YAML
    assert cfg.model == "gpt2-tiny"  # YAML beats default
    assert cfg.batch_size == PretrainConfig().batch_size  # default kept


def test_all_problems_reported_together(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lr: fast\nbatch_sise: 3\n")
    with pytest.raises(UsageError) as e:
        build_config(PretrainConfig, str(y), {"out": "x", "steps": "many"})
    msg = str(e.value)
    assert "batch_sise" in msg and "valid options" in msg and "batch_size" in msg
    assert "lr" in msg and "steps" in msg
    assert "\n" not in msg


def test_validation_errors():
    with pytest.raises(UsageError, match="min_lr"):
        build_config(PretrainConfig, None, {"out": "x", "min_lr": 1.0, "lr": 0.1})
    with pytest.raises(UsageError, match="--out is required"):
        build_config(PretrainConfig, None, {})
    with pytest.raises(UsageError, match="true or false"):
        build_config(PretrainConfig, None, {"out": "x", "resume": "perhaps"})


def test_yaml_that_is_not_a_mapping(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(UsageError, match="mapping"):
        build_config(PretrainConfig, str(y), {"out": "x"})
    y.write_text("lr: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        build_config(PretrainConfig, str(y), {"out": "x"})


def test_parse_set_and_dump():
    assert parse_set(["lr=1e-3", "steps=5", "data=a.txt,b.txt"]) == {"lr": "1e-3", "steps": 5, "data": "a.txt,b.txt"}
    cfg = build_config(PretrainConfig, None, {"out": "x", **parse_set(["data=a.txt,b.txt"])}, check=False)
    assert cfg.data == ["a.txt", "b.txt"]
    with pytest.raises(UsageError, match="key=value"):
        parse_set(["lr"])
    text = dump_yaml(build_config(PretrainConfig, None, {"out": "x"}))
    assert "lr: 0.003  # Peak learning rate." in text


RECIPE_CONFIGS = {**STAGE_CONFIGS, "data": DataConfig}  # every command a recipe file can configure


def _stage_of(path: Path) -> str | None:
    for stage in sorted(RECIPE_CONFIGS, key=len, reverse=True):
        if path.stem.startswith(stage):
            return stage
    return None


STAGE_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if _stage_of(p) and "accelerate" not in p.parts)


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_loads(path):
    stage = _stage_of(path)
    cfg = build_config(RECIPE_CONFIGS[stage], str(path), {"out": "/tmp/recipe-check"}, check=False)
    # Inputs (--out, --base/--policy/--reward that `llm run` wires from earlier stages, llm data's --source)
    # come from the command line.
    problems = [p for p in cfg.validate()
                if "--out" not in p and "does not exist" not in p and "not found" not in p and "is required" not in p
                and "no --source" not in p]
    assert not problems, problems


def test_default_recipe_equals_builtin_defaults():
    """recipes/default/pretrain.yaml restates the built-in defaults; they must not drift apart."""
    from lifecycle.config import read_yaml

    defaults = PretrainConfig()
    for k, v in read_yaml(ROOT / "recipes/default/pretrain.yaml").items():
        assert getattr(defaults, k) == pytest.approx(v) if isinstance(v, float) else getattr(defaults, k) == v, k


def test_run_recipes_load():
    from lifecycle.runner import load_recipe

    plan = load_recipe(str(ROOT / "recipes/default"))
    assert [s for s, _, _ in plan][0] == "pretrain"
    for stage, path, _ in plan:
        assert path is None or Path(path).is_file(), path


@pytest.mark.parametrize("path", sorted((ROOT / "recipes/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    """Every shipped Accelerate config loads with Accelerate's own config reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2
    assert str(cfg.distributed_type).split(".")[-1] in {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"}


# Digests of every stage's default config (json, sorted keys), taken before the configs were split into shared
# groups (ppo without its former dora/merge): the default lifecycle must keep exactly these values.
# sft's max_length default then went from 128 to 0 (inherit the base's training length: 64 for the
# default base, which gives the same weights since no world example is longer). ppo then gained five options
# (rollout_micro_batch_size, gradient_checkpointing, lr_scheduler, warmup_steps, kl_in_loss) whose defaults keep
# its behaviour; without those five keys its digest is still 1a903d2bd3131622.
# (pretrain..ppo re-pinned when TrainCommon gained overwrite=False and verify=False; without those two keys
# the hashes are the earlier 3d0d2a1ba615f935, 25189e8867f99d90, 532c7507fb00a0ed, 7b3521d3f5ab5596)
# pretrain gained vocab_multiple=1 (no rounding: the same model; without it 159fa1ec453bdf4f); sft's lr went from
# 2e-3 to 3e-4 (re-tuned on trl 1.16, recipes/default/sft.yaml; with 2e-3 a29b93c1ac0f6ad3).
# cpu_threads went from 1 to 0 (torch's one thread per core: bit-identical weights with 1 or 2 threads, 1.3-1.8x
# faster on an idle 2-core machine; with 1: sft 0bbda8f9f7a63491, reward f0bbb0880921edfc, dpo b27a8d401285f3e5,
# grpo 9278cfc5fdb60893) and ppo's steps from 150 to 100 (the same gold accuracy over seeds 0-2 at a lower KL;
# with 150: 1a2d15bf70d9c107).
DEFAULTS_SHA256 = {"pretrain": "edb978a6daa5055a", "sft": "498712d1f1144e65", "reward": "81feb65b1334fb47",
                   "ppo": "d55f6bb2c1b2eb22",
                   # dpo and grpo: their tuned recipes' values (recipes/default/dpo.yaml, grpo.yaml)
                   # (grpo re-tuned to kl_coef 0.3, lr 3e-5 on the lr-3e-4 SFT model; before: 22a48cab4300437d;
                   # then stop_on_collapse=False added, which keeps its behaviour: c1ab6fddc1e64374 without it)
                   "dpo": "58f8a9d5c8f81700", "grpo": "7c6d2f5b37488966"}


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_defaults_are_pinned(stage):
    import dataclasses
    import hashlib
    import json

    d = dataclasses.asdict(STAGE_CONFIGS[stage]())
    assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16] == DEFAULTS_SHA256[stage], d


INPUTS = {"pretrain": {}, "sft": {"base": "b"}, "reward": {"base": "b"}, "ppo": {"policy": "p", "reward": "r"},
          "dpo": {"base": "b"}, "grpo": {"base": "p", "reward_fn": "gold"}}


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_length_and_its_check_are_the_same_for_every_stage(stage):
    cls = STAGE_CONFIGS[stage]
    cfg = build_config(cls, None, {"out": "x", **INPUTS[stage]})
    assert cfg.total_steps == cfg.steps == cls().steps  # -1: the recipe's length
    assert build_config(cls, None, {"out": "x", "max_steps": 3, **INPUTS[stage]}).total_steps == 3
    for bad in (0, -2):
        with pytest.raises(UsageError, match=f"max_steps={bad}; must be positive"):
            build_config(cls, None, {"out": "x", "max_steps": bad, **INPUTS[stage]})


def test_every_group_reports_its_problems_at_once():
    from lifecycle.config import PeftCommon, RewardConfig, TrainCommon

    assert TrainCommon(out="x").validate() == []
    assert PeftCommon(lora=True, qlora=True, lora_r=0).validate() == [
        "--lora and --qlora both given; pick one (--qlora already trains LoRA adapters, on a 4-bit base)",
        "lora_r=0; must be at least 1"]
    with pytest.raises(UsageError) as e:
        build_config(RewardConfig, None, {"max_steps": 0, "lora_r": 0, "lr": 2, "world_samples": 0})
    msg = str(e.value)
    for needle in ("--out is required", "max_steps=0", "lora_r=0", "--base is required", "lr=2.0", "world_samples=0"):
        assert needle in msg, needle


def test_every_recipe_file_is_checked():
    """Each YAML under recipes/ is a stage recipe or an Accelerate config (both loaded by the tests above) or a
    lifecycle recipe (run.yaml), whose stages' configs are built here; a new recipe cannot go unchecked."""
    from lifecycle.runner import load_recipe

    for p in (ROOT / "recipes").rglob("*.y*ml"):
        if p.name == "run.yaml" or p.stem.startswith("run-"):  # run-dpo.yaml: a lifecycle recipe with `align:`
            for stage, path, inline in load_recipe(str(p)):
                build_config(STAGE_CONFIGS[stage], path, {"out": "x", **inline}, check=False)
        elif p.stem.startswith("sweep-"):  # a search space: its stage's config at every corner of the space
            from lifecycle.config import SweepConfig
            from lifecycle.sweep import check

            stage = p.stem.removeprefix("sweep-")
            recipe = ROOT / "recipes/default" / f"{stage}.yaml"
            check(SweepConfig(stage=stage, space=str(p), recipe=str(recipe), out=str(Path("/tmp") / f"sweep-check-{os.getpid()}")))
        else:
            assert p in STAGE_RECIPES or "accelerate" in p.parts, p
