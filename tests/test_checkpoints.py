"""One checkpoint vocabulary: both writers' names, complete-markers, discovery, the recipe check on resume,
and saves that print nothing of their own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lifecycle import artifacts, checkpoints
from lifecycle.config import PretrainConfig, SFTConfig, build_config
from lifecycle.errors import UsageError


def _ours(out: Path, step: int, state: dict | None = None, text: str | None = None) -> Path:
    d = checkpoints.checkpoint_root(out) / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(text if text is not None else json.dumps({"step": step, **(state or {})}))
    return d


def _trainers(out: Path, step: int, complete: bool = True) -> Path:
    d = checkpoints.checkpoint_root(out) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_discovery_knows_both_writers_and_skips_what_a_kill_cut_short(tmp_path):
    ours, trainer = tmp_path / "pretrain", tmp_path / "sft"
    assert checkpoints.latest_checkpoint(ours) is None and checkpoints.list_checkpoints(ours) == []
    a = _ours(ours, 2)
    b = _ours(ours, 10)
    _ours(ours, 12, text='{"step": 1')  # marker cut short
    (checkpoints.checkpoint_root(ours) / "step-000014").mkdir()  # no marker at all
    (checkpoints.checkpoint_root(ours) / ".tmp-step-000016").mkdir()  # a temporary
    assert checkpoints.list_checkpoints(ours) == [a, b]  # numeric order: 2 before 10
    assert checkpoints.latest_checkpoint(ours) == b

    c = _trainers(trainer, 9)
    d = _trainers(trainer, 30)
    _trainers(trainer, 40, complete=False)  # the Trainer writes trainer_state.json last
    assert checkpoints.list_checkpoints(trainer) == [c, d]
    assert checkpoints.latest_checkpoint(trainer) == d
    assert [checkpoints.checkpoint_step(x) for x in (a, b, c, d)] == [2, 10, 9, 30]
    assert checkpoints.checkpoint_step(tmp_path / "checkpoint-x") is None
    assert checkpoints.require_checkpoint(trainer) == d
    with pytest.raises(UsageError, match="no checkpoint under .*drop --resume"):
        checkpoints.require_checkpoint(tmp_path / "nothing")
    # One writer's checkpoints only (pruning uses this).
    _trainers(ours, 50)
    assert checkpoints.list_checkpoints(ours, "step-") == [a, b]
    assert checkpoints.latest_checkpoint(ours).name == "checkpoint-50"


def test_discard_incomplete_leaves_the_trainer_nothing_newer_than_the_newest_complete(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "sft"
    good = _trainers(out, 2)
    _trainers(out, 4, complete=False)
    assert get_last_checkpoint(str(checkpoints.checkpoint_root(out))) != str(good)  # the Trainer would take the broken one
    gone = checkpoints.discard_incomplete(out)
    assert [g.name for g in gone] == ["checkpoint-4"]
    assert get_last_checkpoint(str(checkpoints.checkpoint_root(out))) == str(good)
    assert checkpoints.list_checkpoints(out) == [good]


def _pretrain_cfg(out, **kw):
    base = dict(out=str(out), model="llama-micro", seq_len=32, batch_size=8, steps=8, world_documents=300, vocab_size=300)
    return build_config(PretrainConfig, None, {**base, **kw})


def test_fingerprint_refuses_a_resume_under_another_recipe(tmp_path, capsys):
    out = tmp_path / "p"
    cfg = _pretrain_cfg(out)
    ck = _ours(out, 4, {"fingerprint": checkpoints.fingerprint(cfg)})
    checkpoints.check_fingerprint(ck, cfg)
    # Options that do not change what is trained may change, and the resume says which did.
    checkpoints.check_fingerprint(ck, _pretrain_cfg(out, log_every=1, save_every=4, eval_every=2, resume=True))
    said = capsys.readouterr().out
    assert "resuming with changed options" in said and "log_every=1 (was 10)" in said and "eval_every=2" in said
    assert "resume=" not in said and "out=" not in said
    checkpoints.check_fingerprint(ck, cfg)
    assert capsys.readouterr().out == ""  # nothing changed: nothing said
    with pytest.raises(UsageError) as e:
        checkpoints.check_fingerprint(ck, _pretrain_cfg(out, lr=1e-3, batch_size=4))
    msg = str(e.value)
    assert "batch_size=8 (now 4)" in msg and "lr=0.003 (now 0.001)" in msg and "drop --resume" in msg
    assert "\n" not in msg
    # Checkpoints that record no recipe (written before fingerprints) resume unchecked.
    checkpoints.check_fingerprint(_ours(tmp_path / "old", 2), _pretrain_cfg(out, lr=1e-3))


def test_pretrain_resume_under_another_recipe_is_refused_before_any_work(tmp_path):
    from lifecycle.stages import pretrain

    out = tmp_path / "p"
    _ours(out, 4, {"fingerprint": checkpoints.fingerprint(_pretrain_cfg(out))})
    with pytest.raises(UsageError, match=r"cannot resume .*seq_len=32 \(now 16\)"):
        pretrain.run(_pretrain_cfg(out, seq_len=16, resume=True))
    assert not (out / "lifecycle.json").exists() and not (out / "log.jsonl").exists()


def test_llm_run_names_the_option_that_changed_and_offers_force(tmp_path):
    from lifecycle.runner import run_lifecycle

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  pretrain: {model: llama-micro, seq_len: 32, steps: 8}\n")
    root = tmp_path / "run"
    recorded = _pretrain_cfg(root / "pretrain", seq_len=16, steps=8, model="llama-micro")
    _ours(root / "pretrain", 4, {"fingerprint": checkpoints.fingerprint(recorded)})
    with pytest.raises(UsageError, match=r"seq_len=16 \(now 32\).*add --force to start pretrain afresh"):
        run_lifecycle(str(recipe), str(root), max_steps=6)


def test_trainer_checkpoints_record_the_recipe_and_check_resume_reads_it(tmp_path, tiny_base):
    from lifecycle import finetune

    out = tmp_path / "sft"
    cfg = build_config(SFTConfig, None, {"out": str(out), "base": str(tiny_base)})
    ck = _trainers(out, 2)
    _trainers(out, 4, complete=False)
    record = finetune._fingerprint_class()(cfg)
    record.on_save(SimpleNamespace(output_dir=str(checkpoints.checkpoint_root(out))),
                   SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    assert json.loads((ck / checkpoints.FINGERPRINT).read_text()) == json.loads(json.dumps(checkpoints.fingerprint(cfg)))

    assert finetune.check_resume(cfg) is False  # no --resume: nothing checked, nothing removed
    assert (checkpoints.checkpoint_root(out) / "checkpoint-4").exists()
    changed = build_config(SFTConfig, None, {"out": str(out), "base": str(tiny_base), "lr": 1e-4, "resume": True})
    with pytest.raises(UsageError, match=r"lr=0.0003 \(now 0.0001\)"):
        finetune.check_resume(changed)
    same = build_config(SFTConfig, None, {"out": str(out), "base": str(tiny_base), "resume": True, "log_every": 1})
    assert finetune.check_resume(same) is True
    assert checkpoints.list_checkpoints(out) == [ck] and not (checkpoints.checkpoint_root(out) / "checkpoint-4").exists()


def test_checkpoint_saves_print_no_tied_weight_warning_and_no_shard_bar(tmp_path, capfd, caplog):
    """Tied embeddings made every save print Accelerate's "Removed shared tensor" warning and
    transformers' "Writing model shards" bar; both stay quiet now, and only while saving."""
    import logging

    import torch
    import transformers

    from lifecycle import training
    from lifecycle.modeling import build_model, model_config

    model = build_model(model_config("llama-micro", 300, 0, 1))
    assert model.config.tie_word_embeddings
    acc = training.make_accelerator()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    transformers.utils.logging.enable_progress_bar()
    caplog.set_level(logging.WARNING)
    capfd.readouterr()
    ck = checkpoints.save_checkpoint(acc, tmp_path, 1, {"x": 1}, keep=2)
    with artifacts.quiet_saving():
        acc.unwrap_model(model).save_pretrained(tmp_path / "model")
    err = capfd.readouterr().err
    assert "Removed shared tensor" not in err + caplog.text and "Writing model shards" not in err, err
    assert json.loads((ck / "state.json").read_text()) == {"step": 1, "x": 1}
    # Restored afterwards: the settings are the caller's again.
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert logging.getLogger("accelerate.utils.other").level == logging.NOTSET
    # A checkpoint still loads into the tied model.
    state = checkpoints.load_checkpoint(acc, ck)
    assert state["step"] == 1
    m = acc.unwrap_model(model)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
