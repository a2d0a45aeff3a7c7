"""`llm ppo`: RLHF with PPO against a reward model, our own loop on Accelerate.

Why our own loop: TRL 1.x ships no PPO trainer, and PPO for language models is
short enough to read in one file when the math lives elsewhere (lifecycle/rl.py,
pure functions with hand-checked tests) and so do the four models
(lifecycle/roles.py). docs/ppo.md gives the equations and where each one lives.

Read `run` top to bottom (its inputs and batch shapes, and `--explain`, come from lifecycle/ppo_plan.py):
  0. check inputs and memory (no weights loaded), load the roles, the reward-model quality gate, resume
  then once per iteration:
  1. `rollout`: sample responses (each process its own share of the prompts), log-probs, values, scores
  2. normalise the scores; a penalty for responses that never end
  3-4. `advantages`: KL-shaped rewards (-β·KL per token, the score on the last token), GAE, whitening
  5. `ppo_update`: epochs over minibatches: clipped surrogate, clipped value loss, early stop on approx KL
  6. metrics, watchdog, held-out `evaluate`, checkpoint
  7. final evaluation and `write_artifact`: the actor (merged if LoRA) + OUT/critic

Simplifications, on purpose: one response per prompt; a reward only at the end
of the response; the score normalisation fixed by the first rollout.

Distribution: Accelerate wraps actor and critic in DDP (or, with a shared base,
the one module that holds both), so gradients are all-reduced; every process
samples its own slice of each global prompt batch with its own seed. Scalars
that decide control flow (normalisation, the KL controller, early stop, stop
requests) are reduced across processes so that all of them take the same path.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import set_seed

from lifecycle import artifacts, checkpoints, guard, rl, sweep, training
from lifecycle.config import PPOConfig, to_dict
from lifecycle.data import world
from lifecycle.errors import Interrupted, UsageError
from lifecycle.generate import Sample, stop_ids
from lifecycle.ppo_plan import explain  # noqa: F401  (`llm ppo --explain` calls the stage's explain)
from lifecycle.ppo_plan import PPOInputs, batch_shape, check_inputs, longest_sequence, rendered_prompts, rollout_batch
from lifecycle.rl import Rollout
from lifecycle.roles import Roles, SharedRoles, load_roles, write_digest
from lifecycle.tokenizer import load_tokenizer
from lifecycle.watchdog import Watchdog

# A programmatic reward instead of the reward model: (rendered prompts, samples) -> one score per sample.
# Each Sample has the response text, its token ids and whether it ended. With one, the reward model is
# not consulted (and its quality gate is skipped); the loop is otherwise unchanged.
RewardFn = Callable[[list[str], list[Sample]], list[float]]


# ---------------------------------------------------------------------------
# 1-2. Rollouts and their scores
# ---------------------------------------------------------------------------
def scores(roles: Roles, raw: list, prompts: list[str], samples: list[Sample], r: Rollout,
           reward_fn: RewardFn | None) -> torch.Tensor:
    """(B,) raw scores: the reward model's (`Roles.score_samples`), or `reward_fn`'s when one is given."""
    if reward_fn is not None:
        return torch.tensor(reward_fn(prompts, samples), dtype=torch.float32, device=r.response_ids.device)
    return roles.score_samples(raw, samples, r)


@torch.no_grad()
def rollout(roles: Roles, raw: list, prompts: list[str], cfg: PPOConfig, stop: list[int], device,
            reward_fn: RewardFn | None) -> tuple[Rollout, list[Sample], torch.Tensor, float]:
    """Sample, then fill in log π_old, log π_ref, V_old and the raw scores. Returns (rollout, samples,
    mean entropy, seconds spent sampling)."""
    B = len(prompts)
    chunk = cfg.rollout_micro_batch_size if 0 < cfg.rollout_micro_batch_size < B else max(B, 1)
    t0 = time.perf_counter()
    samples = roles.sample(prompts, cfg, stop, batch_size=chunk)  # batched, KV cache; cut at the first stop id
    t_gen = time.perf_counter() - t0
    r = roles.to_rollout(prompts, samples, device)
    # The four passes run `chunk` episodes at a time (rollout_micro_batch_size): each (b, T, V) block of logits
    # is reduced to (b, T) before the next chunk's is made. Every chunk keeps the batch's padded width.
    ent_sum, parts = torch.zeros((), device=device), {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    for c0 in range(0, B, chunk):
        sl = slice(c0, c0 + chunk)
        u = r if chunk >= B else r.select(torch.arange(c0, min(c0 + chunk, B), device=device))
        logits = roles.logits(u)  # (b, T, V)
        parts["logprobs"].append(rl.logprobs_from_logits(logits, u.response_ids, cfg.temperature))
        ent_sum = ent_sum + rl.masked_sum(rl.entropy_from_logits(logits, cfg.temperature), u.response_mask)
        del logits
        parts["ref_logprobs"].append(rl.logprobs_from_logits(roles.ref_logits(u), u.response_ids, cfg.temperature))
        parts["values"].append(roles.values(u) * u.response_mask)
        parts["scores"].append(scores(roles, raw[sl], prompts[sl], samples[sl], u, reward_fn))
    for k, v in parts.items():
        setattr(r, k, v[0] if len(v) == 1 else torch.cat(v))
    entropy = ent_sum / r.response_mask.sum().clamp(min=1)
    return r, samples, entropy, t_gen


# ---------------------------------------------------------------------------
# 3-4. Rewards and advantages
# ---------------------------------------------------------------------------
@torch.no_grad()
def advantages(r: Rollout, score: torch.Tensor, beta: float, cfg: PPOConfig) -> torch.Tensor:
    """Fill r.rewards, r.kl (KL-shaped rewards), r.advantages, r.returns (GAE); returns the critic's explained variance."""
    r.rewards, r.kl = rl.kl_shaped_rewards(score, r.logprobs, r.ref_logprobs, r.response_mask, beta, cfg.kl_estimator)
    r.advantages, r.returns = rl.gae(r.rewards, r.values, r.response_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        r.advantages = rl.masked_whiten(r.advantages, r.response_mask)
    return rl.explained_variance(r.values, r.returns, r.response_mask)


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights, optimizers and RNG (Accelerate's part)."""

    kl_ctl: rl.FixedKLController | rl.AdaptiveKLController
    dog: Watchdog
    norm: dict | None = None  # {"mean", "std"} of the first rollout's scores, then fixed
    initial: dict | None = None  # the held-out evaluation before training
    gate: dict | None = None  # the reward-model gate's findings
    fingerprint: dict | None = None  # the options the run was started with (checkpoints.fingerprint)

    def state_dict(self) -> dict:
        return {"norm": self.norm, "initial": self.initial, "kl_ctl": self.kl_ctl.state_dict(),
                "watchdog": self.dog.state_dict(), "gate": self.gate or {}, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self.norm, self.initial, self.gate = state["norm"], state["initial"], state.get("gate", {})
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.dog.load_state_dict(state["watchdog"])


STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "grad_norm", "critic_grad_norm", "kl_loss")


def make_optimizer(roles: Roles, cfg: PPOConfig):
    """One AdamW with two parameter groups, actor (lr) then critic (critic_lr). One optimizer means one loss
    scaler step per minibatch under fp16, and gradients unscaled once (`clip_groups`). The multi-tensor (foreach)
    path: the per-parameter loop's arithmetic bit for bit, in a few calls per step (on a GPU it is the default)."""
    return torch.optim.AdamW([{"params": roles.actor_params(), "lr": cfg.lr, "name": "actor"},
                              {"params": roles.critic_params(), "lr": cfg.critic_lr, "name": "critic"}],
                             weight_decay=cfg.weight_decay, foreach=True)


def clip_groups(opt, max_norm: float) -> list[torch.Tensor]:
    """Unscale the gradients once (fp16 loss scaling), then clip each parameter group's norm on its own:
    the actor's and the critic's gradient norms, as two optimizers would. Returns the norms before clipping."""
    scaler = getattr(opt, "scaler", None)  # Accelerate's prepared optimizer carries the GradScaler under fp16
    if scaler is not None:
        scaler.unscale_(opt.optimizer)
    return [torch.as_tensor(torch.nn.utils.clip_grad_norm_(g["params"], max_norm), dtype=torch.float32).detach()
            for g in opt.param_groups]


def lr_factor(iteration: int, cfg: PPOConfig) -> float:
    """The learning-rate multiplier for PPO iteration `iteration` (0-based), the same for actor and critic:
    linear warmup over `warmup_steps` iterations, then constant, linear decay or cosine decay towards 0 at the
    run's last iteration."""
    w, n = cfg.warmup_steps, cfg.total_steps
    if iteration < w:
        return (iteration + 1) / w
    if cfg.lr_scheduler == "constant" or n <= w:
        return 1.0
    p = (iteration - w) / (n - w)
    return 1.0 - p if cfg.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(opt, iteration: int, cfg: PPOConfig) -> None:
    f = lr_factor(iteration, cfg)
    for g, base in zip(opt.param_groups, (cfg.lr, cfg.critic_lr)):
        g["lr"] = base * f


# ---------------------------------------------------------------------------
# 5. The PPO update
# ---------------------------------------------------------------------------
def ppo_update(roles: Roles, r: Rollout, opt, acc, cfg: PPOConfig, MB: int, micro: int,
               kl_coef: float = 0.0) -> tuple[dict, int, bool]:
    """cfg.ppo_epochs passes over the rollout in minibatches of MB episodes (micro-batches of `micro` accumulate).
    `kl_coef` is β, used here only with kl_in_loss. Returns (summed per-minibatch stats, optimizer steps taken,
    whether approx KL stopped it early)."""
    B = r.response_ids.shape[0]
    stats = {k: torch.zeros((), device=acc.device) for k in STATS}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, device=acc.device)
        for m0 in range(0, B, MB):
            mb = r.select(perm[m0 : m0 + MB])
            mb_stats = minibatch_step(roles, mb, acc, cfg, micro, kl_coef)
            # Early stop on approximate KL, agreed by all processes (the step is skipped, as in SB3's PPO).
            if cfg.target_kl > 0 and acc.reduce(mb_stats["approx_kl"].clone(), reduction="mean").item() > cfg.target_kl:
                opt.zero_grad(set_to_none=True)
                return stats, n_updates, True
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            mb_stats["grad_norm"], mb_stats["critic_grad_norm"] = clip_groups(opt, clip)
            if cfg.mixed_precision != "fp16":  # fp16: the scaler skips an overflowing step by itself
                guard.check_update(f"update {n_updates + 1} of this iteration",
                                   {"actor gradient norm": mb_stats["grad_norm"].item(),
                                    "critic gradient norm": mb_stats["critic_grad_norm"].item()}, cfg.out)
            opt.step()  # under fp16: the scaler's step (skipped on inf/nan) and one update
            opt.zero_grad(set_to_none=True)
            for k in stats:
                stats[k] += mb_stats[k]
            n_updates += 1
    return stats, n_updates, False


def minibatch_step(roles: Roles, mb: Rollout, acc, cfg: PPOConfig, micro: int, kl_coef: float = 0.0) -> dict:
    """Forward and backward of one minibatch, micro-batch by micro-batch; gradients all-reduced on the last only.
    The minibatch loss is a token mean: each micro-batch weighs by its share of the tokens."""
    n_tok = mb.response_mask.sum().clamp(min=1)
    out = {k: torch.zeros((), device=acc.device) for k in STATS}
    MB = mb.response_ids.shape[0]
    chunks = list(range(0, MB, micro))
    for j, c0 in enumerate(chunks):
        u = mb.select(torch.arange(c0, min(c0 + micro, MB), device=acc.device))
        w = u.response_mask.sum() / n_tok
        with contextlib.ExitStack() as no_sync:
            if j < len(chunks) - 1:
                for m in roles.trained:
                    no_sync.enter_context(acc.no_sync(m))
            logits, v = roles.train_forward(u)  # (b, T, V), (b, T)
            logp = rl.logprobs_from_logits(logits, u.response_ids, cfg.temperature)
            pg, st = rl.policy_loss(logp, u.logprobs, u.advantages, u.response_mask, cfg.clip_range)
            loss = pg
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * rl.masked_mean(rl.entropy_from_logits(logits, cfg.temperature), u.response_mask)
            if cfg.kl_in_loss:  # β·E_t[k(π_θ, π_ref)] with its gradient (GRPO's form; rl.kl_loss)
                kl_l = rl.kl_loss(logp, u.ref_logprobs, u.response_mask, cfg.kl_estimator)
                loss = loss + kl_coef * kl_l
                out["kl_loss"] += kl_l.detach() * w
            vl, vst = rl.value_loss(v, u.values, u.returns, u.response_mask, cfg.value_clip)
            acc.backward((loss + vl) * w)  # separate parameters, separate optimizers: one backward
        for k, x in (("policy_loss", pg), ("value_loss", vl), ("clipfrac", st["clipfrac"]),
                     ("approx_kl", st["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
            out[k] += x.detach() * w
    return out


# ---------------------------------------------------------------------------
# 6. Evaluation, the reward-model gate, metrics
# ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(roles: Roles, raw_eval: list, eval_prompts: list[str], problems: list | None, acc, cfg: PPOConfig,
             stop: list[int], reward_fn: RewardFn | None) -> dict:
    """Held-out: greedy responses scored by the reward model (and the gold checker), and KL on sampled responses.

    Each process takes every W-th held-out prompt; sums are reduced across processes.
    The KL is exact per token (a sum over the vocabulary), summed along sampled
    responses: an unbiased, low-variance estimate of KL(π(y|x) || π_ref(y|x)) by
    the chain rule of KL.
    """
    idx = list(range(acc.process_index, len(eval_prompts), acc.num_processes))
    prompts, raw = [eval_prompts[i] for i in idx], [raw_eval[i] for i in idx]
    sums = torch.zeros(8, device=acc.device)  # score, gold, n, kl, length, ended, gold on carry problems, carry problems
    if prompts:
        greedy = roles.sample(prompts, cfg, stop, greedy=True)
        r = roles.to_rollout(prompts, greedy, acc.device)
        sums[0] = scores(roles, raw, prompts, greedy, r, reward_fn).sum()
        if problems is not None:
            right = [world.gold_check(problems[i].question, s.text, s.ended) for i, s in zip(idx, greedy)]
            carry = [problems[i].has_carry for i in idx]
            sums[1], sums[6], sums[7] = sum(right), sum(r and c for r, c in zip(right, carry)), sum(carry)
        sums[2] = len(prompts)
        sums[4] = r.response_mask.sum()
        sums[5] = r.ended.float().sum()
        r = roles.to_rollout(prompts, roles.sample(prompts, cfg, stop), acc.device)
        lp = torch.log_softmax(roles.logits(r).float() / cfg.temperature, -1)
        lq = torch.log_softmax(roles.ref_logits(r).float() / cfg.temperature, -1)
        kl_tok = (lp.exp() * (lp - lq)).sum(-1)  # (B, T) exact KL(π(·|s_t) || π_ref(·|s_t))
        sums[3] = (kl_tok * r.response_mask).sum()
    sums = acc.reduce(sums, reduction="sum")
    n = sums[2].clamp(min=1)
    res = {"eval_score": (sums[0] / n).item(), "eval_kl": (sums[3] / n).item(),
           "eval_length": (sums[4] / n).item(), "eval_eos_rate": (sums[5] / n).item()}
    if problems is not None:
        res["eval_gold_accuracy"] = (sums[1] / n).item()
        res["eval_gold_accuracy_carry"] = (sums[6] / sums[7].clamp(min=1)).item()
        res["eval_gold_accuracy_nocarry"] = ((sums[1] - sums[6]) / (n - sums[7]).clamp(min=1)).item()
    return res


@torch.no_grad()
def rm_gate(roles: Roles, raw_train: list, train_prompts: list[str], rm_manifest: dict | None, acc,
            cfg: PPOConfig, stop: list[int]) -> dict:
    """The reward-model quality gate: its held-out pairwise accuracy (from its manifest) and whether its score
    follows response length. Two sampled responses per prompt; the length bias is measured within each prompt's
    pair (score difference against length difference), so prompts whose answers are simply longer do not count."""
    W, rank = acc.num_processes, acc.process_index
    rm_acc = ((rm_manifest or {}).get("metrics") or {}).get("eval_accuracy")
    n = max(1, cfg.gate_samples // (2 * W))
    idx = training.batch_indices(0, n * W, len(train_prompts), cfg.seed + 1, rng="python")[rank * n : (rank + 1) * n]
    idx = idx + idx
    prompts, raw = [train_prompts[i] for i in idx], [raw_train[i] for i in idx]
    samples = roles.sample(prompts, cfg, stop)
    r = roles.to_rollout(prompts, samples, acc.device)
    sc, ln = roles.score_samples(raw, samples, r), r.response_mask.sum(1)
    both = acc.gather(torch.stack([sc[:n], sc[n:], ln[:n], ln[n:]], 1)).cpu()  # (n·W, 4) per prompt
    corr_all = rl.pearson(both[:, :2].flatten().tolist(), both[:, 2:].flatten().tolist())
    corr = rl.pearson((both[:, 0] - both[:, 1]).tolist(), (both[:, 2] - both[:, 3]).tolist())
    found = []
    if rm_acc is None:
        training.say("reward-model gate: its manifest records no eval_accuracy; its quality is unknown")
    elif rm_acc < cfg.gate_min_accuracy:
        found.append(f"held-out pairwise accuracy {rm_acc:.3f} < {cfg.gate_min_accuracy}")
    if abs(corr) > cfg.gate_max_length_corr:
        found.append(f"between two responses to the same prompt its score follows their length "
                     f"(r = {corr:+.2f}, limit ±{cfg.gate_max_length_corr})")
    training.say(f"reward-model gate: pairwise accuracy {f'{rm_acc:.3f}' if rm_acc is not None else 'unknown'}; "
                 f"score-length correlation {corr:+.2f} within prompts ({corr_all:+.2f} over all {2 * len(both)} samples)")
    if found:
        msg = "reward-model quality gate: " + "; ".join(found)
        if cfg.strict:
            raise UsageError(msg + "; train a better reward model, or drop --strict to go on anyway")
        training.say("warning: " + msg + " (PPO may learn to exploit it; --strict refuses)")
    return {"rm_eval_accuracy": rm_acc, "rm_length_corr": corr, "rm_length_corr_all": corr_all}


def iteration_metrics(acc, r: Rollout, samples: list[Sample], entropy, ev, stats: dict, n_updates: int,
                      all_scores: torch.Tensor) -> dict:
    """One iteration's metrics, averaged over processes."""
    local = torch.stack([
        r.kl.sum(1).mean(), entropy, r.response_mask.sum(1).mean(), r.ended.float().mean(), ev,
        r.rewards.sum(1).mean(), torch.tensor(rl.distinct_n([s.token_ids for s in samples], 2), device=acc.device),
        *(stats[k] / max(n_updates, 1) for k in stats),
    ]).float()
    names = ["kl", "entropy", "response_length", "eos_rate", "explained_variance", "reward", "distinct_2", *stats]
    m = dict(zip(names, acc.reduce(local, reduction="mean").tolist()))
    m.update(score_mean=all_scores.mean().item(), score_std=all_scores.std().item() if all_scores.numel() > 1 else 0.0)
    return m


def peak_memory_mib(device, reset: bool = True) -> float | None:
    """This process's memory high-water mark since the last reset, in MiB: allocated GPU memory on CUDA, resident
    memory (VmHWM, reset through /proc/self/clear_refs) on the CPU; None where it cannot be read."""
    try:
        if torch.device(device).type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            if reset:
                torch.cuda.reset_peak_memory_stats(device)
            return peak
        status = Path("/proc/self/status").read_text()
        peak = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) / 1024
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, StopIteration, ValueError, RuntimeError):
        return None


def _gold(m: dict) -> str:
    return f" | gold {100 * m['eval_gold_accuracy']:.1f}%" if "eval_gold_accuracy" in m else ""


def progress_line(step: int, total: int, m: dict, seconds: float, eta: float) -> str:
    return (f"iter {step}/{total} | score {m['score_mean']:.2f}±{m['score_std']:.2f} | KL {m['kl']:.3f} | "
            f"ent {m['entropy']:.3f} | clip {m['clipfrac']:.3f} | akl {m['approx_kl']:.4f} | "
            f"vloss {m['value_loss']:.3f} | EV {m['explained_variance']:.2f} | len {m['response_length']:.2f} | "
            f"eos {100 * m['eos_rate']:.0f}%" + (f" | gold(sampled) {100 * m['gold_train']:.0f}%" if "gold_train" in m else "")
            + f" | {seconds:.2f}s/it | ETA {training.format_eta(eta)}")


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def run(cfg: PPOConfig, *, reward_fn: RewardFn | None = None) -> Path:
    """Train the policy with PPO and write the artifact at cfg.out. `reward_fn`, when given, replaces the reward
    model's score (see `RewardFn`): for scripted rewards, in tests and experiments. Runs under the --out rules
    every stage keeps (lifecycle/guard.py)."""
    with guard.claim(cfg):
        return _run(cfg, reward_fn=reward_fn)


def _run(cfg: PPOConfig, *, reward_fn: RewardFn | None = None) -> Path:
    # -- 0. inputs, memory, roles, gate, state ---------------------------------------------------
    t_wall = time.perf_counter()
    out = Path(cfg.out)
    ck = checkpoints.resume_checkpoint(cfg, warn=training.say) if cfg.resume else None  # same stage, recipe, length
    inputs = check_inputs(cfg)
    guard.verify(cfg, inputs.policy, inputs.reward, inputs.critic)
    guard.check_disk(cfg, inputs.policy)
    guard.check_lora_targets(cfg, inputs.policy)
    training.check_tracker(cfg)
    training.quiet()
    acc = training.make_accelerator(mixed_precision=cfg.mixed_precision,
                                    log_with=None if cfg.report_to == "none" else cfg.report_to,
                                    project_config=training.project_config(out))
    say, W, rank = training.say, acc.num_processes, acc.process_index
    G = cfg.prompts_per_rollout
    B, MB, micro = batch_shape(cfg, W)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    say(f"prompts: {inputs.prompts.about}")
    tok = load_tokenizer(inputs.policy.path)
    raw_train, raw_eval, train_prompts, eval_prompts = rendered_prompts(cfg, tok, inputs.prompts)
    longest = longest_sequence(cfg, tok, train_prompts + eval_prompts)
    guard.check_context(inputs.policy, longest, "the longest prompt with max_new_tokens",
                        "shorten the prompts or lower max_new_tokens")
    est = training.check_memory(cfg, inputs.policy, "ppo", batch_size=micro, gpus=W, seq_len=longest,
                                rollout_batch_size=rollout_batch(cfg, B))
    if est is not None:
        say(f"memory estimate: {est.total_bytes / 2**20:,.1f} MiB per process at its peak ({est.peak_phase}); "
            f"--explain shows the rows")
    set_seed(cfg.seed)  # identical initialisation on every process
    roles = load_roles(cfg, inputs.policy, inputs.reward, inputs.critic, say)
    for m in roles.trained:
        m.eval()  # no dropout anywhere: the ratio π/π_old must be exactly 1 before the first update
    say(roles.describe())
    say(f"each iteration: {G} prompts ({B} per process x {W}) -> {cfg.ppo_epochs} epochs x {G // cfg.minibatch_size} "
        f"minibatches of {cfg.minibatch_size} ({-(-MB // micro)} micro-batch(es) of {micro} per process); --explain shows memory")
    opt = roles.prepare(acc, make_optimizer(roles, cfg))
    if cfg.gradient_checkpointing:
        say(roles.enable_gradient_checkpointing())
    if cfg.kl_estimator != "k1" and not cfg.kl_in_loss:
        say(f"warning: kl_estimator={cfg.kl_estimator} in the reward: its value estimates KL(π‖π_ref), but as a reward "
            f"its policy gradient is not KL's (Tang & Munos 2025); use k1 in the reward, or kl_in_loss=true with k3 (GRPO) or k2")
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses
    stop = stop_ids(roles.tok, roles.generation_model())
    roles.check_reading(raw_train[0], stop)
    problems = inputs.prompts.problems
    st = LoopState(kl_ctl=rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                   else rl.FixedKLController(cfg.kl_coef),
                   dog=Watchdog(negative_kl=cfg.watch_negative_kl, length_drift=cfg.watch_length_drift,
                                distinct=cfg.watch_distinct, eos_rate=cfg.watch_eos_rate, entropy=cfg.watch_entropy,
                                hack_gold_drop=cfg.watch_hack_gold_drop),
                   fingerprint=checkpoints.fingerprint(cfg))
    if ck is None and reward_fn is None:
        st.gate = rm_gate(roles, raw_train, train_prompts, inputs.reward.manifest, acc, cfg, stop)
    start = 0
    if ck is not None:
        state = checkpoints.load_checkpoint(acc, ck)
        st.load_state_dict(state)
        start = state["step"]
        if st.norm is not None and roles.critic_source == inputs.reward.path:
            roles.set_value_scale(st.norm["mean"], st.norm["std"])
        say(f"resumed from {ck} at iteration {start}")
    else:
        st.initial = evaluate(roles, raw_eval, eval_prompts, problems, acc, cfg, stop, reward_fn)
        st.dog.observe_eval(0, st.initial["eval_score"], st.initial.get("eval_gold_accuracy"))
    log = training.MetricLog(out / "log.jsonl", acc, truncate_after_step=start if ck is not None else None)
    if ck is None:
        log.log(0, **st.initial)
    say(f"iteration {start}: held-out score {st.initial['eval_score']:.3f}{_gold(st.initial)} | "
        f"KL {st.initial['eval_kl']:.3f}" + (" (initial)" if ck is None else ""))
    if acc.is_main_process and cfg.report_to != "none":
        acc.init_trackers("ppo", config={k: v for k, v in to_dict(cfg).items() if isinstance(v, (int, float, str, bool))})

    total, last_eval, step = cfg.total_steps, st.initial, start
    t_start = time.perf_counter()
    with training.GracefulStop() as stop_signal:
        while step < total:
            peak_memory_mib(acc.device)  # reset: the two peaks below are this iteration's
            t0 = time.perf_counter()
            idx = training.batch_indices(step, G, len(train_prompts), cfg.seed, rng="python")[rank * B : (rank + 1) * B]
            prompts, raw = [train_prompts[i] for i in idx], [raw_train[i] for i in idx]

            # -- 1. rollout: samples, log π_old, log π_ref, V_old, raw scores ------------------------
            r, samples, entropy, t_gen = rollout(roles, raw, prompts, cfg, stop, acc.device, reward_fn)

            # -- 2. normalised score (the first rollout fixes the normalisation), missing-EOS penalty ---
            all_scores = acc.gather(r.scores)
            if st.norm is None:
                st.norm = rl.score_normalisation(all_scores, cfg.normalize_reward)
                if roles.critic_source == inputs.reward.path:  # the critic reads the reward model's raw scale
                    roles.set_value_scale(st.norm["mean"], st.norm["std"])
                    r.values = (r.values - st.norm["mean"]) / st.norm["std"] * r.response_mask
            score = rl.normalised_scores(r.scores, st.norm, r.ended, cfg.missing_eos_penalty)

            # -- 3-4. KL-shaped rewards, GAE advantages and returns ------------------------------------
            beta = st.kl_ctl.value
            ev = advantages(r, score, 0.0 if cfg.kl_in_loss else beta, cfg)
            t_roll = time.perf_counter() - t0
            mem_roll = peak_memory_mib(acc.device)

            # -- 5. PPO epochs over minibatches --------------------------------------------------------
            t1 = time.perf_counter()
            if cfg.lr_scheduler != "constant" or cfg.warmup_steps:
                set_lr(opt, step, cfg)
            stats, n_updates, stopped_early = ppo_update(roles, r, opt, acc, cfg, MB, micro, beta)
            t_upd = time.perf_counter() - t1
            mem_upd = peak_memory_mib(acc.device, reset=False)
            step += 1

            # -- 6. metrics, watchdog, evaluation, checkpoint ------------------------------------------
            m = iteration_metrics(acc, r, samples, entropy, ev, stats, n_updates, all_scores)
            if mem_roll is not None and mem_upd is not None:
                m.update(rollout_peak_mib=mem_roll, update_peak_mib=mem_upd)
            m.update(beta=beta, lr=opt.param_groups[0]["lr"], updates=n_updates, epochs_stopped_early=int(stopped_early), rollout_seconds=t_roll,
                     update_seconds=t_upd, generate_seconds=t_gen, episodes=step * G,
                     rollout_tokens_per_second=acc.reduce(r.response_mask.sum(), reduction="sum").item() / max(t_gen, 1e-9))
            if not cfg.prompts:  # built-in world: gold accuracy of the sampled training responses
                gold = sum(world.gold_check(p, s.text, s.ended) for p, s in zip(prompts, samples)) / max(len(samples), 1)
                m["gold_train"] = acc.reduce(torch.tensor(gold, device=acc.device), reduction="mean").item()
            st.kl_ctl.update(m["kl"], G)
            alarms = st.dog.observe_step(step, m)
            if step % cfg.eval_every == 0 or step == total:
                last_eval = evaluate(roles, raw_eval, eval_prompts, problems, acc, cfg, stop, reward_fn)
                m.update(last_eval)
                # `llm sweep` only: the trial's pruner may stop this run here (a no-op otherwise); the names are the manifest's.
                sweep.report_eval(step, total, {"score": last_eval["eval_score"], "kl": last_eval["eval_kl"],
                                                **({"gold_accuracy": last_eval["eval_gold_accuracy"]} if "eval_gold_accuracy" in last_eval else {})})
                alarms += st.dog.observe_eval(step, last_eval["eval_score"], last_eval.get("eval_gold_accuracy"))
            if st.dog.active:
                m["alarms"] = sorted(st.dog.active)
            log.log(step, **m)
            if step % cfg.log_every == 0 or step == total or step == start + 1:
                elapsed = time.perf_counter() - t_start
                say(progress_line(step, total, m, t_roll + t_upd, elapsed / (step - start) * (total - step)))
            if "eval_score" in m:
                say(f"iter {step}: held-out score {m['eval_score']:.3f}{_gold(m)} | KL {m['eval_kl']:.3f} nats/response")
            for a in alarms:
                say(f"WATCHDOG [{a['alarm']}] at iteration {a['step']}: {a['message']}")
            if cfg.debug_digest:
                write_digest(out, rank, step, roles)
            if acc.reduce(torch.tensor(1.0 if stop_signal.requested else 0.0, device=acc.device), reduction="sum").item() > 0:
                path = checkpoints.save_checkpoint(acc, out, step, st.state_dict(), cfg.keep_checkpoints)
                raise Interrupted(f"{stop_signal.requested or 'signal'} at iteration {step}: checkpoint saved to {path}; "
                                  "continue with --resume")
            if alarms and cfg.stop_on_collapse:
                path = checkpoints.save_checkpoint(acc, out, step, st.state_dict(), cfg.keep_checkpoints)
                raise Interrupted(f"watchdog ({', '.join(a['alarm'] for a in alarms)}) at iteration {step}: checkpoint "
                                  f"saved to {path}; inspect OUT/log.jsonl, then --resume or change the recipe")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                checkpoints.save_checkpoint(acc, out, step, st.state_dict(), cfg.keep_checkpoints)

    # -- 7. final evaluation and the artifact ----------------------------------------------------
    final = last_eval if step == total and start < total else evaluate(roles, raw_eval, eval_prompts, problems,
                                                                        acc, cfg, stop, reward_fn)
    checkpoints.save_checkpoint(acc, out, total, st.state_dict(), cfg.keep_checkpoints)  # a later --resume: no-op
    metrics = final_metrics(st, final, total, G, time.perf_counter() - t_start)
    metrics["wall_seconds"] = time.perf_counter() - t_wall
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_artifact(cfg, inputs, roles, stop, metrics, st.dog, out)
        g = (f" | gold accuracy {100 * metrics['gold_accuracy_initial']:.1f}% -> {100 * metrics['gold_accuracy']:.1f}%"
             if "gold_accuracy" in metrics else "")
        say(f"held-out score {metrics['score_initial']:.3f} -> {metrics['score']:.3f}{g} | KL {metrics['kl']:.3f} nats "
            f"| {metrics['train_seconds']:.0f}s | wrote {out}")
        if st.dog.events:
            say(f"watchdog raised: {', '.join(sorted(set(metrics['watchdog_alarms'])))} (see OUT/log.jsonl and lifecycle.json)")
    acc.wait_for_everyone()
    acc.end_training()
    return out


# ---------------------------------------------------------------------------
# 7. The artifact
# ---------------------------------------------------------------------------
def final_metrics(st: LoopState, final: dict, total: int, G: int, train_seconds: float) -> dict:
    initial, dog = st.initial, st.dog
    metrics = {
        "score_initial": initial["eval_score"], "score": final["eval_score"], "kl": final["eval_kl"],
        "response_length": final["eval_length"], "eos_rate": final["eval_eos_rate"],
        "iterations": total, "episodes": total * G, "train_seconds": train_seconds,
        "beta_final": st.kl_ctl.value, "reward_norm": st.norm, "reward_hacking": dog.hacking,
        "watchdog_alarms": [e["alarm"] for e in dog.events], **(st.gate or {}),
    }
    if "eval_gold_accuracy" in initial:
        metrics["gold_accuracy_initial"] = initial["eval_gold_accuracy"]
        metrics["gold_accuracy"] = final["eval_gold_accuracy"]
        for k in ("carry", "nocarry"):
            metrics[f"gold_accuracy_{k}_initial"] = initial.get(f"eval_gold_accuracy_{k}")
            metrics[f"gold_accuracy_{k}"] = final.get(f"eval_gold_accuracy_{k}")
    return metrics


def write_artifact(cfg: PPOConfig, inputs: PPOInputs, roles: Roles, stop: list[int], metrics: dict, dog: Watchdog,
                   out: Path) -> None:
    """OUT: the actor as a plain causal LM (merged when LoRA), OUT/critic: the critic as a sequence classifier.
    The actor's generation_config lists every stop id, so stock `generate` stops where our sampler does."""
    tok = roles.tok
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        actor, critic, extra_dirs = roles.final_models(cfg, inputs.policy.path, Path(tmp))

        def write_critic(d: Path) -> None:
            critic.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)

        extra_dirs["critic"] = write_critic
        actor.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
        actor.generation_config.pad_token_id = tok.pad_token_id
        artifacts.save_model_artifact(
            actor, tok, out, stage="ppo", config=to_dict(cfg), metrics=metrics,
            parent=artifacts.parent_record(inputs.policy), seed=cfg.seed, extra_dirs=extra_dirs,
            extra={"reward": artifacts.parent_record(inputs.reward), "critic_init": roles.critic_source,
                   "shared_base": isinstance(roles, SharedRoles), "watchdog": dog.events},
        )
