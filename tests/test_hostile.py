"""Hostile and careless use of every stage: each case is refused in one line with the right exit status,
leaves every file that existed before byte-identical and nothing new behind; kills, signals and
divergence in the TRL stages keep the promises pretrain keeps."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle import artifacts, checkpoints
from lifecycle.config import PretrainConfig, RewardConfig, SFTConfig, build_config
from lifecycle.errors import TrainingDiverged, UsageError


def snapshot(root: Path) -> dict:
    """Every path under root: a file's sha256, a directory's None (so new empty directories count too)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_base, tiny_rm):
    """Inputs for the refusal table: damaged copies of the tiny base, runs left behind, a file in the way."""
    d = tmp_path_factory.mktemp("hostile")
    base = Path(tiny_base)
    _copy_base(base, d / "basecopy")
    _copy_base(Path(tiny_rm), d / "rm")
    (d / "afile").write_text("keep me")
    # An older run's checkpoints in an --out.
    other = checkpoints.checkpoint_root(d / "other") / "step-000005"
    other.mkdir(parents=True)
    (other / "state.json").write_text(json.dumps({"step": 5}))
    # Manifests that are not ours to read.
    for name, text in (("m_list", "[1, 2]"), ("m_files_list", None), ("m_no_stage", None)):
        _copy_base(base, d / name)
        if text is not None:
            (d / name / "lifecycle.json").write_text(text)
    _edit_json(d / "m_files_list" / "lifecycle.json", lambda m: {**m, "files": list(m["files"])})
    _edit_json(d / "m_no_stage" / "lifecycle.json", lambda m: {k: v for k, v in m.items() if k != "stage"})
    # Killed after its files moved in, before its manifest was written.
    _copy_base(base, d / "unfinished")
    (d / "unfinished" / "lifecycle.json").unlink()
    (d / "unfinished" / artifacts.PUBLISHING).write_text("123")
    # A manifest whose kind was edited; a config.json that belongs to another model.
    _copy_base(base, d / "kind_edited")
    _edit_json(d / "kind_edited" / "lifecycle.json", lambda m: {**m, "kind": artifacts.REWARD_MODEL})
    _copy_base(base, d / "vocab")
    _edit_json(d / "vocab" / "config.json", lambda c: {**c, "vocab_size": c["vocab_size"] + 64})
    size = (d / "vocab" / "config.json").stat().st_size  # edited with its manifest, so only the content disagrees
    _edit_json(d / "vocab" / "lifecycle.json", lambda m: {**m, "files": {**m["files"], "config.json": size},
                                                          "checksums": {}})
    # A tokenizer larger than the model's vocabulary (config.json and the weights agree with each other).
    _copy_base(base, d / "bigtok")
    tok = json.loads((d / "bigtok" / "tokenizer.json").read_text())
    top = max(tok["model"]["vocab"].values())
    tok["added_tokens"].append({"id": top + 100, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (d / "bigtok" / "tokenizer.json").write_text(json.dumps(tok))
    _edit_json(d / "bigtok" / "lifecycle.json", lambda m: {**m, "checksums": {}, "files": {
        **m["files"], "tokenizer.json": (d / "bigtok" / "tokenizer.json").stat().st_size}})
    # One flipped byte inside a tensor: same size, same header.
    _copy_base(base, d / "flipped")
    w = d / "flipped" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    # A pretrain checkpoint where sft is asked to resume; an sft checkpoint past the asked length.
    pt = build_config(PretrainConfig, None, {"out": str(d / "ptck")})
    ck = checkpoints.checkpoint_root(d / "ptck") / "step-000004"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 4, "fingerprint": checkpoints.fingerprint(pt)}))
    sft = build_config(SFTConfig, None, {"out": str(d / "past"), "base": str(base)})
    ck = checkpoints.checkpoint_root(d / "past") / "checkpoint-20"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    checkpoints.write_fingerprint(ck, sft)
    return d


# (name, argv with {d} for the inputs and {base} for the tiny base, a word the message must contain)
CASES = [
    # 1. an --out holding an older run's checkpoints
    ("pretrain-into-another-runs-checkpoints", "pretrain --out {d}/other --set steps=2", "--overwrite"),
    ("pretrain-resume-and-overwrite", "pretrain --out {d}/other --resume --overwrite", "pick one"),
    # 2. NaN and out-of-range options, refused before anything loads
    ("sft-weight-decay-nan", "sft --base {base} --out {d}/o --set weight_decay=nan", "finite"),
    ("ppo-kl-coef-nan", "ppo --policy {base} --reward {d}/nope --out {d}/o --set kl_coef=nan", "finite"),
    ("pretrain-lr-inf", "pretrain --out {d}/o --set lr=.inf", "finite"),
    ("pretrain-negative-seed", "pretrain --out {d}/o --set seed=-1", "seed"),
    ("pretrain-beta1-above-one", "pretrain --out {d}/o --set beta1=2", "beta1"),
    ("sft-unknown-lora-target", "sft --base {base} --out {d}/o --lora --set lora_target_modules=qq_proj", "qq_proj"),
    ("generate-empty-prompt", "generate --model {base} ''", "prompt"),
    ("generate-past-the-context", "generate --model {base} --max-new-tokens 100000 hello", "context"),
    # 5. --out equal to or inside an input
    ("sft-out-is-base", "sft --base {d}/basecopy --out {d}/basecopy", "overwrite what it reads"),
    ("sft-out-inside-base", "sft --base {d}/basecopy --out {d}/basecopy/sub", "inside"),
    ("reward-out-is-base", "reward --base {d}/basecopy --out {d}/basecopy", "overwrite what it reads"),
    ("sft-base-inside-out", "sft --base {d}/basecopy --out {d}", "inside --out"),
    # 7. an --out that cannot be written
    ("sft-out-under-a-file", "sft --base {base} --out {d}/afile/x", "is a file"),
    ("sft-out-in-proc", "sft --base {base} --out /proc/llm-out", "not writable"),
    ("pretrain-out-in-proc", "pretrain --out /proc/llm-out/p", "not writable"),
    # 8. --resume on another stage's checkpoint; 14. past the asked length
    ("sft-resume-from-a-pretrain-checkpoint", "sft --base {base} --out {d}/ptck --resume", "llm pretrain"),
    ("sft-resume-past-max-steps", "sft --base {base} --out {d}/past --resume --max-steps 10", "past this run's 10 steps"),
    # 9. killed before its manifest; 10. malformed manifests
    ("sft-base-killed-before-manifest", "sft --base {d}/unfinished --out {d}/o", "unfinished"),
    ("sft-manifest-a-list", "sft --base {d}/m_list --out {d}/o", "malformed"),
    ("sft-manifest-files-a-list", "sft --base {d}/m_files_list --out {d}/o", "files"),
    ("sft-manifest-without-stage", "sft --base {d}/m_no_stage --out {d}/o", "no stage"),
    ("run-from-manifest-without-stage", "run --from-manifest {d}/m_no_stage --out {d}/r", "no stage"),
    ("generate-manifest-a-list", "generate --model {d}/m_list hello", "malformed"),
    # 11. config.json against the weights; 16. an edited kind
    ("sft-vocab-mismatch", "sft --base {d}/vocab --out {d}/o", "vocab_size"),
    ("generate-vocab-mismatch", "generate --model {d}/vocab hello", "vocab_size"),
    ("sft-kind-edited", "sft --base {d}/kind_edited --out {d}/o", "edited"),
    ("sft-tokenizer-past-the-vocabulary", "sft --base {d}/bigtok --out {d}/o", "tokenizer has"),
    # 15. the command that makes a missing policy
    ("ppo-policy-missing", "ppo --policy {d}/nope --reward {base} --out {d}/o", "llm sft"),
    # checksums with --verify
    ("sft-verify-flipped-byte", "sft --base {d}/flipped --out {d}/o --verify", "checksum"),
    ("ppo-verify-flipped-byte", "ppo --policy {d}/flipped --reward {d}/rm --out {d}/o --verify", "checksum"),
    ("dpo-verify-flipped-byte", "dpo --base {d}/flipped --out {d}/o --verify", "checksum"),
    ("grpo-verify-flipped-byte", "grpo --policy {d}/flipped --reward-fn gold --out {d}/o --verify", "checksum"),
]


def _run_cli(argv: str, d: Path, base: Path) -> subprocess.CompletedProcess:
    import shlex

    args = [a.format(d=d, base=base) for a in shlex.split(argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_changes(hostile, tiny_base, name, argv, needle):
    before = snapshot(hostile)
    r = _run_cli(argv, hostile, tiny_base)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-1500:]
    assert needle.lower() in errors[0].lower(), errors[0]
    if name == "ppo-policy-missing":
        assert "llm reward" not in errors[0], errors[0]
    assert snapshot(hostile) == before, "a refused run changed or left files"
    assert not Path("/proc/llm-out").exists()


def test_the_flipped_byte_passes_without_verify(hostile):
    """Sizes are checked always, content only with --verify (hashing every file costs a read of the model)."""
    artifacts.check_artifact(str(hostile / "flipped"), artifacts.CAUSAL_LM, "--base")
    with pytest.raises(UsageError, match="model.safetensors's content does not match its checksum"):
        artifacts.check_artifact(str(hostile / "flipped"), artifacts.CAUSAL_LM, "--base", verify=True)
    m = artifacts.read_manifest(hostile / "basecopy")
    assert m["checksums"] == {n: artifacts.file_digest(hostile / "basecopy" / n) for n in m["files"]}


def test_a_parent_is_hashed_once_per_process_until_it_changes(hostile, tmp_path, monkeypatch):
    """`llm run` hands sft's output to reward and to ppo: with --verify the second check does not read the
    files again, but a file changed since (its size or modification time) is hashed afresh and caught."""
    art = _copy_base(hostile / "basecopy", tmp_path / "parent")
    hashed = []
    real = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda f, *a, **k: hashed.append(Path(f).name) or real(f, *a, **k))
    artifacts.check_artifact(str(art), artifacts.CAUSAL_LM, "--base", verify=True)
    first = len(hashed)
    assert "model.safetensors" in hashed
    artifacts.check_artifact(str(art), artifacts.CAUSAL_LM, "--policy", verify=True)
    assert len(hashed) == first  # nothing read twice
    w = art / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="model.safetensors's content does not match its checksum"):
        artifacts.check_artifact(str(art), artifacts.CAUSAL_LM, "--policy", verify=True)


# ---------------------------------------------------------------------------
# --overwrite, --resume and the lock (pretrain: our loop, in process)
# ---------------------------------------------------------------------------
TINY = dict(model="llama-micro", seq_len=32, batch_size=8, steps=4, warmup_steps=1, eval_every=4, eval_batches=1,
            log_every=2, world_documents=200, vocab_size=300, save_every=2)


def _pt(out, **kw):
    return build_config(PretrainConfig, None, {"out": str(out), **TINY, **kw})


def test_a_new_run_never_continues_an_older_one(tmp_path):
    """Defect 1: run A, then run B (another seed) into the same --out: refused; with --overwrite B replaces A,
    and a later --resume continues B, under B's seed."""
    from lifecycle.stages import pretrain

    out = tmp_path / "B"
    pretrain.run(_pt(out))
    before = snapshot(out)
    with pytest.raises(UsageError, match="holds another run's checkpoints .*--resume.*--overwrite"):
        pretrain.run(_pt(out, seed=7, steps=2))
    assert snapshot(out) == before
    pretrain.run(_pt(out, seed=7, overwrite=True))
    cks = checkpoints.list_checkpoints(out)
    assert [c.name for c in cks] == ["step-000002", "step-000004"]
    assert all(checkpoints.recorded_fingerprint(c)["seed"] == 7 for c in cks)
    assert artifacts.read_manifest(out)["seed"] == 7
    assert not list(out.glob(".replaced-*")) and not (out / ".lock").exists()
    # --resume under the first run's seed is refused: the checkpoints are B's.
    with pytest.raises(UsageError, match=r"seed=7 \(now 0\)"):
        pretrain.run(_pt(out, resume=True))


def test_a_refused_overwrite_puts_the_older_run_back(tmp_path):
    from lifecycle.stages import pretrain

    out = tmp_path / "run"
    pretrain.run(_pt(out, steps=2))
    before = snapshot(out)
    with pytest.raises(UsageError, match="not found"):
        pretrain.run(_pt(out, overwrite=True, data=[str(tmp_path / "missing.txt")]))
    assert snapshot(out) == before


def test_a_live_run_locks_its_out(tmp_path):
    """Defect 12: a second run on an --out that a live process holds is refused; a killed holder's lock is free."""
    from lifecycle.stages import pretrain

    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"in use by a running process {holder.pid}"):
            pretrain.run(_pt(out, steps=2))
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    pretrain.run(_pt(out, steps=2, save_every=0))  # the lock died with its holder
    assert artifacts.is_complete(out) and not (out / ".lock").exists()


def test_a_full_disk_mid_run_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    """Defect 6: ENOSPC while writing the artifact: one line with the checkpoint to resume from, no staging left."""
    from lifecycle.stages import pretrain

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "model.safetensors"))

    monkeypatch.setattr(artifacts, "publish", full)
    out = tmp_path / "full"
    with pytest.raises(UsageError, match=r"the disk is full while writing .*step-000004: free space and continue with --resume"):
        pretrain.run(_pt(out))
    assert not list(out.glob(".staging-*")) and not (out / ".lock").exists()
    monkeypatch.undo()
    pretrain.run(_pt(out, resume=True))
    assert artifacts.is_complete(out)


# ---------------------------------------------------------------------------
# The Trainer's checkpoints follow the same completion rule
# ---------------------------------------------------------------------------
def test_an_unmarked_trainer_checkpoint_beside_marked_ones_is_passed_over_with_a_warning(tmp_path):
    out = tmp_path / "sft"
    cfg = build_config(SFTConfig, None, {"out": str(out), "base": "b", "resume": True})
    root = checkpoints.checkpoint_root(out)
    for step, marked in ((2, True), (4, False)):  # a kill between the Trainer's save and our marker
        ck = root / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if marked:
            checkpoints.write_fingerprint(ck, cfg)
    said = []
    assert checkpoints.resume_checkpoint(cfg, warn=said.append) == root / "checkpoint-2"
    assert len(said) == 1 and "checkpoint-4" in said[0] and "incomplete" in said[0] and "checkpoint-2" in said[0]
    (root / "checkpoint-2" / checkpoints.FINGERPRINT).write_text('{"lr": ')  # a marker cut short
    with pytest.raises(UsageError, match="no checkpoint under .*checkpoint-2, checkpoint-4"):
        checkpoints.resume_checkpoint(cfg)


SFT = dict(max_steps=6, world_examples=48, eval_problems=0, batch_size=8, eval_batch_size=16, warmup_steps=0,
           save_every=1, log_every=1, eval_every=100, keep_checkpoints=2)


def _sft(base, out, **kw):
    return build_config(SFTConfig, None, {"base": str(base), "out": str(out), **SFT, **kw})


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sft_divergence_stops_before_the_update_and_keeps_good_checkpoints(tiny_base, tmp_path, monkeypatch):
    """Defect 2: a NaN loss from step 3 on: exit-3 error naming the step and the last good checkpoint, no artifact."""
    import trl

    from lifecycle.stages import sft

    real = trl.SFTTrainer.compute_loss

    def poisoned(self, *a, **k):
        loss = real(self, *a, **k)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", poisoned)
    out = tmp_path / "div"
    with pytest.raises(TrainingDiverged, match="diverged at step 3: gradient norm nan") as e:
        sft.run(_sft(tiny_base, out))
    assert "checkpoint-2" in str(e.value) and "lower lr" in str(e.value)
    assert not (out / "lifecycle.json").exists() and not (out / ".lock").exists()
    assert [c.name for c in checkpoints.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert all(t.isfinite().all() for t in _weights(checkpoints.latest_checkpoint(out)).values())


def _kill_and_resume(stage: str, argv: list[str], out: Path, signals: list[tuple[int, float]]) -> list[int]:
    """Start the stage, and each time let it write a checkpoint of its own, then send a signal `delay` later;
    the next start resumes. Returns the exit codes; the last run finishes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    codes = []
    for sig, delay in signals:
        before = checkpoints.latest_checkpoint(out)
        p = subprocess.Popen(argv + (["--resume"] if before else []), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            now = checkpoints.latest_checkpoint(out)
            if now is not None and now != before:
                break
            time.sleep(0.02)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(sig)
        _, err = p.communicate(timeout=180)
        codes.append(p.returncode)
        if sig == signal.SIGTERM and p.returncode == 130:
            assert "stopped: SIGTERM at" in err and "continue with --resume" in err, err[-1500:]
        assert checkpoints.latest_checkpoint(out) is not None
        assert not (out / "lifecycle.json").exists() or artifacts.is_complete(out)
    r = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    codes.append(r.returncode)
    return codes


def _argv(stage: str, values: dict) -> list[str]:
    args = [sys.executable, "-m", "lifecycle", stage]
    for k, v in values.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_signals_and_kill_9_then_resume_equal_an_uninterrupted_run(stage, tiny_base, tiny_rm, tmp_path):
    """Defects 3 and 4: SIGTERM saves a checkpoint and exits 130; kill -9 (some land inside checkpoint writes)
    leaves the newest complete checkpoint resumable; the resumed run's weights equal an uninterrupted run's."""
    from lifecycle.config import PPOConfig
    from lifecycle.stages import ppo, reward, sft

    values = {**SFT, "max_steps": 8, "base": str(tiny_base)}
    if stage == "reward":
        values = {k: v for k, v in values.items() if k not in ("world_examples", "eval_problems")}
        values.update(world_prompts=24, world_samples=2, eval_problems=8, batch_size=4)
    if stage == "ppo":
        values = {k: v for k, v in vars(_ppo(tiny_base, tiny_rm, "x", max_steps=8)).items()
                  if k in ("policy", "reward", "critic", "max_steps", "prompts_per_rollout", "minibatch_size",
                           "micro_batch_size", "max_new_tokens", "eval_prompts", "eval_every", "world_prompts",
                           "save_every", "log_every", "normalize_reward")}
    ref = tmp_path / "ref"
    cfg_cls, mod = {"sft": (SFTConfig, sft), "reward": (RewardConfig, reward), "ppo": (PPOConfig, ppo)}[stage]
    mod.run(build_config(cfg_cls, None, {"out": str(ref), **values}))

    out = tmp_path / "run"
    argv = _argv(stage, {"out": out, **values})
    codes = _kill_and_resume(stage, argv, out, [(signal.SIGTERM, 0.0), (signal.SIGKILL, 0.05), (signal.SIGKILL, 0.3)])
    assert codes[0] == 130, codes
    assert artifacts.is_complete(out)
    assert _max_diff(_weights(ref), _weights(out)) <= 1e-6


# ---------------------------------------------------------------------------
# ppo: the same guards around our own loop
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_base):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lifecycle.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    conf = AutoConfig.from_pretrained(tiny_base, num_labels=1)
    conf.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(conf)
    out = tmp_path_factory.mktemp("hostile_rm")
    artifacts.save_model_artifact(rm, tok, out, stage="reward", config={}, metrics={"eval_accuracy": 0.9}, parent=None, seed=0)
    return out


def _ppo(tiny_base, tiny_rm, out, **kw):
    from lifecycle.config import PPOConfig

    values = dict(policy=str(tiny_base), reward=str(tiny_rm), out=str(out), critic="policy", max_steps=4,
                  prompts_per_rollout=8, minibatch_size=8, micro_batch_size=8, max_new_tokens=4, eval_prompts=8,
                  eval_every=100, world_prompts=64, save_every=1, log_every=100, normalize_reward=False)
    return build_config(PPOConfig, None, {**values, **kw})


def test_ppo_divergence_stops_before_the_update(tiny_base, tiny_rm, tmp_path):
    """A reward that turns NaN at the second iteration: exit-3 error, the iteration-1 checkpoint kept and finite."""
    from lifecycle.stages import ppo

    calls = []

    def reward_fn(prompts, samples):  # call 1: initial eval, 2: iteration 1, 3: iteration 2
        calls.append(1)
        return [float("nan") if len(calls) >= 3 else 0.5 for _ in samples]

    out = tmp_path / "ppo"
    with pytest.raises(TrainingDiverged, match="diverged at update 1 .*gradient norm nan.*step-000001"):
        ppo.run(_ppo(tiny_base, tiny_rm, out), reward_fn=reward_fn)
    assert [c.name for c in checkpoints.list_checkpoints(out)] == ["step-000001"]
    assert not (out / "lifecycle.json").exists() and not (out / ".lock").exists()


def test_ppo_refuses_an_out_with_another_runs_checkpoints_and_its_own_input(tiny_base, tiny_rm, tmp_path):
    from lifecycle.stages import ppo

    out = tmp_path / "other"
    (checkpoints.checkpoint_root(out) / "step-000003").mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="holds another run's checkpoints"):
        ppo.run(_ppo(tiny_base, tiny_rm, out))
    with pytest.raises(UsageError, match="is the input --reward"):
        ppo.run(_ppo(tiny_base, tiny_rm, tiny_rm))
    assert snapshot(tmp_path) == before


def test_a_refused_pretrain_leaves_no_tokenizer_or_checkpoints_directory(tmp_path, monkeypatch):
    """Defect 19: a refusal after the tokenizer was saved (here: the disk check) leaves no --out behind."""
    from lifecycle import training
    from lifecycle.stages import pretrain

    def full(*a, **k):
        raise UsageError("not enough disk space (simulated)")

    monkeypatch.setattr(training, "check_disk", full)
    out = tmp_path / "a" / "b"
    with pytest.raises(UsageError, match="simulated"):
        pretrain.run(_pt(out))
    assert not (tmp_path / "a").exists()


def test_a_list_option_splits_at_commas_but_keeps_an_existing_path_whole(tmp_path):
    """Defect 18 (in part): `--set data=a, b` is two files, and a file whose name holds a comma is one."""
    assert build_config(PretrainConfig, None, {"out": "o", "data": "a.txt, b.txt"}).data == ["a.txt", "b.txt"]
    odd = tmp_path / "x,y.txt"
    odd.write_text("text")
    assert build_config(PretrainConfig, None, {"out": "o", "data": str(odd)}).data == [str(odd)]


def test_a_write_error_in_any_wrapper_is_recognised_as_a_full_disk(tmp_path):
    """torch.save and safetensors report ENOSPC as a RuntimeError with the system's message: still one line."""
    from lifecycle import guard

    cfg = build_config(PretrainConfig, None, {"out": str(tmp_path / "o")})
    assert guard._disk_error(RuntimeError("[enforce fail] file write failed: No space left on device")) == errno.ENOSPC
    assert guard._disk_error(ValueError("shape mismatch")) is None
    with pytest.raises(UsageError, match="the filesystem is read-only while writing; no checkpoint was written"):
        with guard.claim(cfg):
            try:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            except OSError as e:
                raise RuntimeError("save failed") from e
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(tiny_base, tmp_path):
    """Defect 8, for checkpoints that record no recipe (written before markers did): LoRA checkpoints resumed
    as full fine-tuning stop in one line instead of the Trainer's traceback."""
    from lifecycle.stages import sft

    out = tmp_path / "lora"
    sft.run(_sft(tiny_base, out, max_steps=2, lora=True))
    for ck in checkpoints.list_checkpoints(out):
        (ck / checkpoints.FINGERPRINT).unlink()  # as an older version wrote them
    before = snapshot(out)
    with pytest.raises(UsageError, match="cannot resume from .*checkpoint-2: it does not fit this model"):
        sft.run(_sft(tiny_base, out, max_steps=3, resume=True))
    assert snapshot(out) == before
