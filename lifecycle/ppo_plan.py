"""What a PPO run will do, worked out before any weights load: its checked inputs, the batch hierarchy of
one iteration, and (`llm ppo --explain`) that hierarchy with the four roles' memory estimate.

`lifecycle/stages/ppo.py` starts from `check_inputs` and `batch_shape`; `explain` reads configs, the
tokenizer and the prompts only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


from lifecycle.artifacts import CAUSAL_LM, REWARD_MODEL, Artifact, check_artifact
from lifecycle.config import PPOConfig
from lifecycle.data.prompts import Prompts, as_user_turns, load_prompts
from lifecycle.errors import UsageError
from lifecycle.generate import render_prompts
from lifecycle.roles import check_reward_artifact
from lifecycle.tokenizer import load_tokenizer


# ---------------------------------------------------------------------------
# Inputs, checked before any weights load
# ---------------------------------------------------------------------------
@dataclass
class PPOInputs:
    policy: Artifact  # the causal LM to improve: actor and reference
    reward: Artifact  # the reward model
    critic: Artifact | None  # where the critic starts when it is neither the reward model nor the policy
    prompts: Prompts  # training and held-out prompts


def check_inputs(cfg: PPOConfig) -> PPOInputs:
    """Policy, reward model, critic source and prompts, all checked before any weights load."""
    try:
        policy = check_artifact(cfg.policy, CAUSAL_LM, "--policy")
    except UsageError:
        check_artifact(cfg.policy, REWARD_MODEL, "--policy")  # the most common slip: the two given the other way round
        check_artifact(cfg.reward, CAUSAL_LM, "--reward")
        raise UsageError(f"--policy {cfg.policy} is a reward model and --reward {cfg.reward} is a causal LM: the two "
                         f"look swapped; pass --policy {cfg.reward} --reward {cfg.policy}") from None
    reward = check_reward_artifact(cfg.reward, "--reward")
    critic = None if cfg.critic in ("reward", "policy") else check_reward_artifact(cfg.critic, "critic")
    prompts = load_prompts(cfg.prompts, column=cfg.prompt_column, eval_prompts=cfg.eval_prompts,
                           world_prompts=cfg.world_prompts, seed=cfg.seed)
    return PPOInputs(policy, reward, critic, prompts)


def rendered_prompts(cfg: PPOConfig, tok, prompts: Prompts) -> tuple[list, list, list[str], list[str]]:
    """(raw train, raw eval, rendered train, rendered eval). With chat_template, plain strings become a user turn,
    as `llm sft` trains them."""
    train, evals = prompts.train, prompts.eval
    if cfg.chat_template and tok.chat_template:
        train, evals = as_user_turns(train), as_user_turns(evals)
    return train, evals, render_prompts(tok, train), render_prompts(tok, evals)


def batch_shape(cfg: PPOConfig, processes: int) -> tuple[int, int, int]:
    """(episodes per process per rollout, per minibatch, per micro-batch)."""
    G, W = cfg.prompts_per_rollout, processes
    if G % W or cfg.minibatch_size % W:
        raise UsageError(f"prompts_per_rollout={G} and minibatch_size={cfg.minibatch_size} must both divide by the "
                         f"{W} processes")
    MB = cfg.minibatch_size // W
    return G // W, MB, min(cfg.micro_batch_size, MB)


def longest_sequence(cfg: PPOConfig, tok, rendered: list[str], sample: int = 4000) -> int:
    """Longest rendered prompt (over the first `sample`) in tokens, plus max_new_tokens."""
    ids = tok(rendered[:sample], add_special_tokens=False)["input_ids"]
    return max(len(i) for i in ids) + cfg.max_new_tokens


def explain(cfg: PPOConfig) -> str:
    """`llm ppo --explain`: the batch hierarchy of one iteration and the memory estimate of the four roles.
    Reads configs, tokenizer and prompts only (no weights); prints (on the main process) and returns the text."""
    inputs = check_inputs(cfg)
    tok = load_tokenizer(inputs.policy.path)
    _, _, train, evals = rendered_prompts(cfg, tok, inputs.prompts)
    W = int(os.environ.get("WORLD_SIZE", "1"))
    B, MB, micro = batch_shape(cfg, W)
    G, steps, n_mb = cfg.prompts_per_rollout, cfg.total_steps, cfg.prompts_per_rollout // cfg.minibatch_size
    seq = longest_sequence(cfg, tok, train[:2000] + evals[:2000])
    text = "\n".join([
        "PPO batch hierarchy (one iteration):",
        f"  rollout batch     {G} prompts ({B} per process x {W} process{'es' if W > 1 else ''}), 1 response each "
        f"of at most {cfg.max_new_tokens} tokens -> {G} episodes (sequences up to {seq} tokens)",
        *([f"  rollout chunks    {-(-B // cfg.rollout_micro_batch_size)} per process of up to "
           f"{cfg.rollout_micro_batch_size} episodes (generation, actor, reference, critic and reward passes)"]
          if 0 < cfg.rollout_micro_batch_size < B else []),
        f"  PPO epochs        {cfg.ppo_epochs} passes over the batch",
        f"  minibatches       {n_mb} per epoch of {cfg.minibatch_size} episodes ({MB} per process)",
        f"  micro-batches     {-(-MB // micro)} per minibatch per process, of up to {micro} episodes (gradient accumulation)",
        f"  optimizer steps   {cfg.ppo_epochs * n_mb} per iteration for the actor and for the critic "
        f"(fewer if approx KL stops an epoch early)",
        f"  run               {steps} iterations -> {steps * G:,} episodes, {steps * cfg.ppo_epochs * n_mb:,} optimizer steps",
        *(["  gradient checkpointing on for actor and critic"] if cfg.gradient_checkpointing else []),
        *([f"  learning rate     {cfg.lr_scheduler}" + (f" after {cfg.warmup_steps} warmup iterations" if cfg.warmup_steps else "")]
          if cfg.lr_scheduler != "constant" or cfg.warmup_steps else []),
        "",
        _estimate_table(inputs, cfg, micro, seq, W, B),
    ])
    if os.environ.get("RANK", "0") == "0":
        print(text)
    return text



def _estimate_table(inputs: PPOInputs, cfg: PPOConfig, micro: int, seq: int, W: int, B: int) -> str:
    """The four roles' memory estimate for --explain, by the same call the run makes before loading (so the two
    cannot disagree); one line when the estimator cannot model the architecture."""
    from lifecycle import training

    said: list[str] = []
    est = training.check_memory(cfg, inputs.policy, "ppo", batch_size=micro, seq_len=seq, gpus=W, force=True,
                                echo=said.append, rollout_batch_size=rollout_batch(cfg, B))
    if est is None:
        return said[0] if said else "memory estimate: not available (a hub model id: its config is not read offline)"
    return est.table()


def rollout_batch(cfg: PPOConfig, B: int) -> int:
    """Sequences sampled at once per process: the rollout's chunk (`rollout_micro_batch_size`), else its whole batch."""
    return min(B, cfg.rollout_micro_batch_size or B)
