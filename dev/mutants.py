"""A mutation check: plant plausible bugs one at a time and see whether the tests catch them.

Each mutant is a small patch (exact text -> replacement, in one or more files). For each, the
repository is copied to a temporary directory (without .venv, runs, .git), the patch applied, and
the mutant's target tests run there with this interpreter and PYTHONPATH pointing at the copy.
A mutant is caught when those tests fail; it is not caught when they pass.

    python dev/mutants.py                 # every mutant (slow: minutes each for the end-to-end ones)
    python dev/mutants.py ppo-no-clip     # one or more by name
    python dev/mutants.py --list          # names and what each plants
    python dev/mutants.py --check         # only check that every patch applies to the code as it is
    python dev/mutants.py --baseline NAME # run NAME's target tests on the unpatched copy (they must pass)

Exit status: 0 when every mutant run was caught, 1 otherwise. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    about: str
    # (file relative to the repo, exact text that must occur once, replacement); the text may be a tuple of
    # alternatives (the code's wording before and after a change), the first found once is replaced
    patches: list[tuple[str, str | tuple[str, ...], str]]
    tests: list[str] = field(default_factory=list)  # pytest node ids or files, relative to the repo


P, S, R, PPO, T = "tests/test_pretrain.py", "tests/test_sft.py", "tests/test_reward.py", "tests/test_ppo.py", "tests/test_memory.py"

MUTANTS = [
    # -- resume ---------------------------------------------------------------------------------------
    Mutant("ppo-resume-no-state", "PPO resume restores no weights and no optimizer state",
           [("lifecycle/stages/ppo.py", "state = checkpoints.load_checkpoint(acc, ck)",
             "state = __import__('json').loads((ck / 'state.json').read_text())")],
           [f"{PPO}::test_resume_equals_an_uninterrupted_run"]),
    Mutant("sft-resume-from-scratch", "SFT resume ignores the checkpoint and trains from scratch",
           [("lifecycle/stages/sft.py", ("trainer.train(resume_from_checkpoint=True if resuming else None)",
                                         "finetune.train(trainer, cfg, resuming)"),
             "finetune.train(trainer, cfg, False)")],
           [f"{S}::test_resume_equals_an_uninterrupted_run"]),
    Mutant("resume-skips-rng", "resume restores weights and optimizer but not the RNG state",
           [("lifecycle/checkpoints.py", "    accelerator.load_state(str(ck))\n",
             "    import torch; _rng = torch.get_rng_state(); accelerator.load_state(str(ck)); torch.set_rng_state(_rng)\n")],
           [f"{P}::test_resume_in_a_new_process_is_exact_with_dropout"]),
    Mutant("peak-probe-global-rng", "the MFU peak probe draws from the global RNG after a resume restored it (bug 1)",
           [("lifecycle/training.py", "gen = torch.Generator().manual_seed(0)", "gen = None")],
           [f"{P}::test_resume_in_a_new_process_is_exact_with_dropout"]),
    # -- learning -------------------------------------------------------------------------------------
    Mutant("sft-loss-on-prompt", "SFT's loss includes the prompt tokens",
           [("lifecycle/stages/sft.py", 'completion_only_loss=cfg.loss_on == "assistant" and not own_masks,',
             "completion_only_loss=False,")],
           [f"{S}::test_collated_batch_masks_the_prompt"]),
    Mutant("reward-swapped", "the reward model trains with chosen and rejected swapped",
           [("lifecycle/stages/reward.py", 'rows = [{"chosen_ids": c, "rejected_ids": r}',
             'rows = [{"chosen_ids": r, "rejected_ids": c}')],
           [f"{R}::test_reward_model_learns_the_preference"]),
    Mutant("ppo-no-clip", "PPO's ratio is forced to 1 (the old log-probs are the new ones: no clipping ever)",
           [("lifecycle/stages/ppo.py", "pg, st = rl.policy_loss(logp, u.logprobs, u.advantages,",
             "pg, st = rl.policy_loss(logp, logp.detach(), u.advantages,")],
           [f"{PPO}::test_large_steps_clip_and_the_value_loss_falls"]),
    Mutant("ppo-critic-frozen", "PPO's critic never steps",
           [("lifecycle/stages/ppo.py", '{"params": roles.critic_params(), "lr": cfg.critic_lr, "name": "critic"}',
             '{"params": roles.critic_params(), "lr": 0.0, "name": "critic"}')],
           [f"{PPO}::test_large_steps_clip_and_the_value_loss_falls"]),
    Mutant("ppo-same-prompts-per-rank", "every PPO process trains on the same prompts",
           [("lifecycle/stages/ppo.py", 'cfg.seed, rng="python")[rank * B : (rank + 1) * B]',
             'cfg.seed, rng="python")[0:B]')],
           [f"{PPO}::test_ranks_train_on_different_prompts"]),
    Mutant("ppo-qlora-actor-bf16", "PPO's QLoRA actor is written in bf16",
           [("lifecycle/stages/ppo.py", "        actor.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop\n",
             "        actor = actor.to(torch.bfloat16) if cfg.qlora else actor\n"
             "        actor.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop\n")],
           [f"{PPO}::test_qlora_runs_on_cpu_and_writes_a_full_precision_actor"]),
    Mutant("pretrain-no-clip", "gradient clipping disabled in pretraining",
           [("lifecycle/stages/pretrain.py", "cfg.grad_clip if cfg.grad_clip > 0 else float(\"inf\")", "float(\"inf\")")],
           [f"{P}::test_clipping_bounds_every_update"]),
    Mutant("pretrain-eval-on-train", "pretraining's held-out evaluation reads training blocks",
           [("lifecycle/stages/pretrain.py", "x = eval_blocks[i : i + cfg.batch_size].to(acc.device)",
             "x = train_blocks[i : i + cfg.batch_size].to(acc.device)")],
           [f"{P}::test_held_out_loss_is_the_loss_on_held_out_blocks"]),
    # -- memory ---------------------------------------------------------------------------------------
    Mutant("memory-qlora-compute-fp32", "the shared dtype table says QLoRA computes in fp32",
           [("lifecycle/memory_arch.py", "pdt, qcompute = 4, 2", "pdt, qcompute = 4, 4")],
           [f"{T}::test_qlora_compute_dtype_is_the_loaders"]),
    Mutant("memory-total-ignores-step-and-buckets", "total_bytes ignores the optimizer-step phase and DDP buckets",
           [("lifecycle/memory.py", "states_total = sum(rows[k] for k in STATE_ROWS)",
             "states_total = sum(rows[k] for k in STATE_ROWS if k != 'ddp_buckets_bytes')"),
            ("lifecycle/memory.py", "total = states_total - grads + max(fwd + live, grads + step)",
             "total = states_total - grads + fwd + live")],
           [f"{T}::test_total_bytes_by_hand"]),
    Mutant("memory-no-cuda-context", "the CUDA context overhead is 0",
           [("lifecycle/memory.py", "CUDA_CONTEXT_BYTES = 512 * MiB", "CUDA_CONTEXT_BYTES = 0 * MiB")],
           [f"{T}::test_total_bytes_by_hand"]),
    Mutant("memory-no-layernorm-rstd", "LayerNorm's saved rstd is not counted",
           [("lifecycle/memory_sim.py", "            self.save(self.new(x.n // h, stat, False))    # rstd\n", "")],
           [f"{T}::test_estimate_matches_measurement"]),
    Mutant("presets-import-torch", "the torch-free presets module imports torch",
           [("lifecycle/presets.py", "from lifecycle.errors import UsageError\n",
             "from lifecycle.errors import UsageError\nimport torch  # noqa: F401,E402\n")],
           [f"{T}::test_presets_and_the_estimate_need_neither_modeling_nor_torch"]),
    # -- artifacts and checkpoints --------------------------------------------------------------------
    Mutant("sft-rewrites-base-config", "sft rewrites the --base config.json (same size) before failing on bad data",
           [("lifecycle/stages/sft.py", "    requested = dataclasses.replace(cfg)  # what checkpoints",
             "    _c = Path(info.path) / 'config.json'; _c.write_text(_c.read_text().replace('silu', 'SiLU'))\n"
             "    requested = dataclasses.replace(cfg)  # what checkpoints")],
           ["tests/test_bad_input.py::test_bad_input[sft-missing-columns]"]),
    Mutant("sft-scratch-beside-out", "sft makes an (empty) scratch directory beside --out, outside the --out guard",
           [("lifecycle/stages/sft.py", "    requested = dataclasses.replace(cfg)  # what checkpoints",
             "    (out.absolute().parent / f'.sft-scratch-{os.getpid()}').mkdir(exist_ok=True)\n"
             "    requested = dataclasses.replace(cfg)  # what checkpoints")],
           ["tests/test_bad_input.py::test_bad_input[sft-missing-columns]"]),
    Mutant("is-complete-ignores-sizes", "an artifact counts as complete whatever its files' sizes",
           [("lifecycle/artifacts.py", "if not f.is_file() or f.stat().st_size != size:", "if not f.is_file():")],
           [f"{P}::test_an_artifact_with_a_file_of_the_wrong_size_is_incomplete"]),
    Mutant("checkpoint-in-place", "checkpoints are written in place, state.json first",
           [("lifecycle/checkpoints.py", 'tmp = root / f".tmp-step-{step:06d}"', "tmp = final"),
            ("lifecycle/checkpoints.py", "    with quiet_saving():\n        accelerator.save_state(",
             "    if accelerator.is_main_process:\n        tmp.mkdir(parents=True, exist_ok=True)\n"
             "        atomic_write_json(tmp / STATE, {\"step\": step, **state})\n"
             "    with quiet_saving():\n        accelerator.save_state("),
            ("lifecycle/checkpoints.py", "        if final.exists():\n            shutil.rmtree(final)\n        os.replace(tmp, final)\n", "")],
           [f"{P}::test_a_kill_inside_a_checkpoint_write_resumes_from_the_one_before"]),
    # -- sampling ---------------------------------------------------------------------------------------
    Mutant("generate-ignores-top-p", "top_p is ignored when sampling",
           [("lifecycle/generate.py", "kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)",
             "kw.update(temperature=temperature, top_k=top_k or None, top_p=1.0)")],
           ["tests/test_generate.py"]),
    # -- code added last round: eval, sweep, data preparation ----------------------------------------------
    Mutant("eval-ties-count-zero", "llm eval's win rate counts a tie as a loss",
           [("lifecycle/eval.py", "return [1.0 if x > y else 0.5 if x == y else 0.0", "return [1.0 if x > y else 0.0 if x == y else 0.0")],
           ["tests/test_eval.py::test_win_rate_counts_ties_half_and_brackets_its_mean",
            "tests/test_eval.py::test_model_against_itself_wins_half"]),
    Mutant("eval-bits-per-byte-in-nats", "llm eval's bits per byte left in nats",
           [("lifecycle/eval.py", "nats / (math.log(2) * nbytes)", "nats / nbytes")],
           ["tests/test_eval.py::test_bits_per_byte_matches_hand_computation", "tests/test_eval.py::test_uniform_model_closed_form"]),
    Mutant("sweep-loss-maximized", "llm sweep maximizes pretraining's held-out loss",
           [("lifecycle/sweep.py", '"pretrain": {"eval_loss": "minimize"', '"pretrain": {"eval_loss": "maximize"')],
           ["tests/test_sweep.py"]),
    Mutant("data-luhn-wrong-digits", "llm data's Luhn check doubles the wrong digits",
           [("lifecycle/data/prep/text.py", "        if i % 2:\n            d = d * 2 - 9", "        if not i % 2:\n            d = d * 2 - 9")],
           ["tests/test_data_prep.py::test_luhn_and_pii_placeholders"]),
    Mutant("data-decontam-misses-last-ngram", "llm data's decontamination never looks at a document's last n-gram",
           [("lifecycle/data/prep/steps.py", "for i in range(len(words) - k + 1):", "for i in range(len(words) - k):")],
           ["tests/test_data_prep.py::test_decontamination_matches_across_line_breaks_case_and_punctuation"]),
    Mutant("ppo-eos-penalty-rewards", "PPO adds the missing-EOS penalty instead of subtracting it",
           [("lifecycle/rl.py", 'norm["std"] - missing_eos_penalty * (~ended)', 'norm["std"] + missing_eos_penalty * (~ended)')],
           ["tests/test_rl.py::test_reward_normalisation_and_the_missing_eos_penalty_by_hand"]),
    Mutant("ppo-norm-biased-std", "PPO's reward normalisation divides by the biased standard deviation",
           [("lifecycle/rl.py", "sd = scores.std().item()", "sd = scores.std(unbiased=False).item()")],
           ["tests/test_rl.py::test_reward_normalisation_and_the_missing_eos_penalty_by_hand"]),
]


def copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", ".pytest_cache", "*.egg-info", "bench_out")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def apply(m: Mutant, root: Path) -> None:
    for rel, olds, new in m.patches:
        path = root / rel
        text = path.read_text(encoding="utf-8")
        old = next((o for o in ((olds,) if isinstance(olds, str) else olds) if text.count(o) == 1), None)
        if old is None:
            raise SystemExit(f"mutant {m.name}: none of the texts to replace occurs exactly once in {rel}: {olds!r}")
        path.write_text(text.replace(old, new), encoding="utf-8")


def run_tests(m: Mutant, root: Path, timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every patch applies")
    ap.add_argument("--baseline", action="store_true", help="run the target tests unpatched (they must pass)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the test output's tail for each mutant")
    args = ap.parse_args(argv)

    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"unknown mutant(s): {', '.join(unknown)}; --list shows the names", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.about}")
        return 0

    failures = 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_repo(pristine)
        for m in chosen:
            root = Path(tmp) / m.name
            shutil.copytree(pristine, root, symlinks=True)
            if not args.baseline:
                apply(m, root)
            if args.check:
                print(f"applies  {m.name}")
                shutil.rmtree(root, ignore_errors=True)
                continue
            rc, output, secs = run_tests(m, root, args.timeout)
            if args.baseline:
                verdict = "passes" if rc == 0 else "FAILS UNPATCHED"
                failures += rc != 0
            elif rc == 1:
                verdict = "caught"
            elif rc == 0:
                verdict = "NOT CAUGHT"
                failures += 1
            else:  # 2-5: interrupted, internal error, usage error, nothing collected; -1: timeout
                verdict = f"ERROR (pytest exit {rc})"
                failures += 1
            print(f"{verdict:16s} {m.name:40s} {secs:6.0f}s  {m.about}", flush=True)
            if args.verbose or verdict not in ("caught", "passes"):
                print("    " + "\n    ".join(output.strip().splitlines()[-15:]), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
