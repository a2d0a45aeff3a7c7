"""The command line is generated from the config dataclasses: each flag's name, default and help are its field's;
a field shared by several stages is one flag definition; only flags the user typed override the recipe."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import types

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

import lifecycle
from lifecycle import cli
from lifecycle.config import (STAGE_CONFIGS, EstimateMemoryConfig, PeftCommon, PPOConfig, RewardConfig, SFTConfig,
                              field_default, field_types)

COMMANDS = {**STAGE_CONFIGS, "estimate-memory": EstimateMemoryConfig}


def _click_command(name: str):
    return typer.main.get_command(cli.app).commands[name]


def _callback(name: str):
    return next(c.callback for c in cli.app.registered_commands if c.name == name)


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_a_flag_with_the_fields_default_and_help(name):
    cls = COMMANDS[name]
    options = {p.name: p for p in _click_command(name).params}
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        o = options[f.name]
        assert o.help == f.metadata["help"], f.name
        default = field_default(f)
        if default is ...:
            assert o.required, f.name
        elif isinstance(default, list):
            assert list(o.default or []) == default and o.multiple, f.name
        else:
            assert o.default == default and type(o.default) is type(default), f.name
        assert cli.flag_name(f) in o.opts, (f.name, o.opts)
        if hints[f.name] is bool:  # every boolean can be switched both ways: --merge / --no-merge
            assert o.secondary_opts == ["--no-" + cli.flag_name(f)[2:]], f.name
    extra = set(options) - {f.name for f in dataclasses.fields(cls)}
    assert extra == (set() if name == "estimate-memory" else {"config", "set_", "print_config"})


def test_a_shared_field_is_one_flag_definition():
    """lora_r, grad_accum, merge... are declared once (a group) and are the same flag for sft and reward."""
    sft, rm, ppo = (inspect.signature(_callback(n)).parameters for n in ("sft", "reward", "ppo"))
    sft_fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    rm_fields = {f.name: f for f in dataclasses.fields(RewardConfig)}
    common = set(sft_fields) & set(rm_fields)
    same = {n for n in common if sft_fields[n] is rm_fields[n]}
    # Only the reward recipe's own defaults are declared again, and they keep the group's help; and sft's
    # max_length, whose 0 (inherit the parent's training length) reward does not have.
    assert common - same == {"steps", "batch_size", "lr", "warmup_steps", "eval_every", "eval_batch_size", "eval_problems",
                             "max_length"}
    for n in common - same - {"eval_problems", "max_length"}:
        assert sft_fields[n].metadata == rm_fields[n].metadata and sft_fields[n].default != rm_fields[n].default, n
    assert len(same) >= 30
    for n in same:
        assert sft[n].default is rm[n].default, n  # the very same typer.Option object
    for n in ("lora", "qlora", "lora_r", "lora_alpha", "out", "seed", "max_steps", "resume", "prompt_column"):
        assert sft[n].default is ppo[n].default, n


def test_estimate_memory_lora_r_is_the_fine_tuning_default():
    assert EstimateMemoryConfig.__dataclass_fields__["lora_r"].default == PeftCommon().lora_r == SFTConfig().lora_r == 8
    text = " ".join(_invoke("estimate-memory", "--help").output.split())
    m = re.search(r"--lora-r <int> (.*?) \[default: (\d+)\]", text)
    assert m, text
    assert m.group(1) == PeftCommon.__dataclass_fields__["lora_r"].metadata["help"]
    assert int(m.group(2)) == PeftCommon().lora_r


def _printed(*args: str) -> dict:
    r = _invoke(*args, "--print-config")
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.output)


def test_yaml_then_set_then_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lr: 1e-3\nsteps: 7\nlora: true\nmerge: false\nlora_r: 4\nseed: 5\n")
    cfg = _printed("sft", "--config", str(y), "--set", "steps=9", "--set", "lr=5e-4", "--set", "seed=6",
                   "--lr", "3e-4", "--no-lora", "--qlora")
    assert cfg["steps"] == 9  # --set beats the YAML
    assert cfg["lr"] == 3e-4  # a flag beats --set
    assert cfg["seed"] == 6
    assert cfg["lora"] is False and cfg["qlora"] is True  # a flag beats the YAML, both ways
    assert cfg["merge"] is False and cfg["lora_r"] == 4  # flags not typed leave the YAML alone
    assert cfg["batch_size"] == SFTConfig().batch_size  # neither: the default
    assert set(cfg) == {f.name for f in dataclasses.fields(SFTConfig)}


def test_legacy_flags_still_parse():
    """Flags the README, docs and tests use, including the ones whose field has another name."""
    cfg = _printed("reward", "--base", "b", "--out", "o", "--data", "x.jsonl", "--data", "y.jsonl", "--init-from", "i",
                   "--dora", "--no-merge", "--max-steps", "3", "--save-every", "2", "--resume", "--seed", "1",
                   "--report-to", "tensorboard", "--force")
    assert cfg["data"] == ["x.jsonl", "y.jsonl"] and cfg["init_from"] == "i" and cfg["dora"] and not cfg["merge"]
    assert (cfg["max_steps"], cfg["save_every"], cfg["resume"], cfg["seed"], cfg["force"]) == (3, 2, True, 1, True)
    cfg = _printed("ppo", "--policy", "p", "--reward", "r", "--prompts", "q.jsonl", "--lora", "--strict",
                   "--stop-on-collapse", "--explain")
    assert cfg["policy"] == "p" and cfg["reward"] == "r" and cfg["strict"] and cfg["stop_on_collapse"] and cfg["explain"]
    cfg = _printed("pretrain", "--tokenizer", "t", "--model", "gpt2-tiny", "--out", "o")
    assert (cfg["tokenizer"], cfg["model"]) == ("t", "gpt2-tiny")
    assert _printed("sft", "--packing")["packing"] is True


def _llm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, timeout=60)


def test_unknown_keys_are_listed_at_once(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("learning_rate: 0.1\nlr: 1e-3\n")
    r = _llm("sft", "--config", str(y), "--set", "lora_rank=8", "--set", "epoch=2", "--print-config")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert f"unknown option learning_rate in {y}" in lines[0]
    assert "unknown options epoch, lora_rank on the command line" in lines[0]
    assert "valid options:" in lines[0] and "lora_r" in lines[0]


def test_ppo_has_no_dora_or_merge():
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    assert "dora" not in names and "merge" not in names
    assert PPOConfig().dora is False  # code that builds adapters for any stage can still read it
    assert PPOConfig(qlora=True).use_peft and not PPOConfig().use_peft
    assert "--dora" not in _invoke("ppo", "--help").output
    r = _llm("ppo", "--set", "dora=true", "--print-config")
    assert r.returncode == 2 and "unknown option dora" in r.stderr, r.stderr


@pytest.fixture
def fake_ppo(monkeypatch):
    calls = []
    mod = types.ModuleType("lifecycle.stages.ppo")
    mod.run = lambda cfg: calls.append(("run", cfg))
    mod.explain = lambda cfg: calls.append(("explain", cfg)) or "text"
    monkeypatch.setitem(sys.modules, "lifecycle.stages.ppo", mod)
    return calls


def test_ppo_explain_is_its_own_entry_point(fake_ppo, tmp_path):
    common = ("ppo", "--policy", "p", "--reward", "r", "--out", str(tmp_path / "o"))
    assert _invoke(*common, "--explain").exit_code == 0
    assert _invoke(*common).exit_code == 0
    assert [(what, cfg.explain) for what, cfg in fake_ppo] == [("explain", True), ("run", False)]
    assert isinstance(fake_ppo[0][1], PPOConfig) and fake_ppo[0][1].policy == "p"


def test_estimate_memory_hands_every_field_to_the_estimator(monkeypatch):
    import lifecycle.memory

    calls = []
    monkeypatch.setattr(lifecycle.memory, "cli_estimate", lambda **kw: calls.append(("estimate", kw)))
    fake = types.ModuleType("lifecycle.memory_measure")
    fake.cli_measure = lambda **kw: calls.append(("measure", kw))
    monkeypatch.setitem(sys.modules, "lifecycle.memory_measure", fake)
    monkeypatch.setattr(lifecycle, "memory_measure", fake, raising=False)

    assert _invoke("estimate-memory", "--model", "llama-2-7b", "--json", "--lora-r", "4", "--seq-len", "512").exit_code == 0
    assert _invoke("estimate-memory", "--model", "gpt2", "--measure").exit_code == 0
    (what, kw), (what2, kw2) = calls
    expected = {f.name: field_default(f) for f in dataclasses.fields(EstimateMemoryConfig) if f.name != "measure"}
    assert what == "estimate" and kw.pop("echo") is typer.echo
    assert kw == {**expected, "model": "llama-2-7b", "as_json": True, "lora_r": 4, "seq_len": 512}
    assert what2 == "measure" and kw2.pop("echo") is typer.echo
    assert kw2 == {**expected, "model": "gpt2"}


def test_estimate_memory_needs_a_model():
    r = _llm("estimate-memory")
    assert r.returncode == 2 and "--model" in r.stderr
