"""Prompts for RL stages: read, check, split into training and held-out sets (no torch).

A prompt is a string or a list of chat messages ({role, content}). On the
built-in world the held-out prompts are its held-out problems, so the gold
checker can grade them; a user's file whose held-out rows all parse as world
problems gets gold accuracy too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lifecycle.data import world
from lifecycle.errors import UsageError

Prompt = Any  # str | list[dict]: a plain prompt or a list of chat messages


@dataclass
class Prompts:
    train: list  # training prompts, each a str or a list of messages
    eval: list  # held-out prompts
    problems: list | None  # the held-out prompts as world problems (gold checker), else None
    about: str  # one line saying where they came from


def check_prompt(row: Any, i: int, column: str, source: str) -> Prompt:
    """The prompt of row `i` (0-based) of `source`, or a UsageError naming the row and the fix."""
    if column not in row:
        cols = ", ".join(sorted(row)) or "none"
        raise UsageError(f"{source} row {i + 1} has no {column!r} column (columns: {cols}); pass --set prompt_column=NAME")
    p = row[column]
    if isinstance(p, str):
        if not p.strip():
            raise UsageError(f"{source} row {i + 1}: the prompt is empty; remove the row")
        return p
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        from lifecycle.data.formats import ROLES

        roles = [m["role"] for m in p]
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise UsageError(f"{source} row {i + 1}: role {bad[0]!r}; a prompt's messages have roles {', '.join(ROLES)}")
        if roles[-1] == "assistant":
            raise UsageError(f"{source} row {i + 1}: the prompt ends with an assistant message; a prompt ends with the "
                             "user's turn (the model writes the answer), so drop the last message")
        return p
    raise UsageError(f"{source} row {i + 1}: {column!r} must be a string or a list of {{role, content}} messages, "
                     f"got {type(p).__name__}")


def load_prompts(path: str | None, *, column: str = "prompt", eval_prompts: int, world_prompts: int,
                 seed: int) -> Prompts:
    """Training and held-out prompts: from `path` (jsonl/json/csv/parquet, see data.files), or the built-in world.

    From a file the last min(eval_prompts, 10%) rows are held out (at least one).
    """
    if not path:
        train = [r["prompt"] for r in world.ppo_prompts(world_prompts, seed=seed)]
        problems = world.heldout_problems(min(eval_prompts, world.N_HELDOUT))
        evals = [[world.user(p.question)] for p in problems]
        return Prompts(train, evals, problems, f"built-in world: {len(train)} training prompts, {len(evals)} held-out problems")
    from lifecycle.data.files import read_records

    rows = read_records(path, column)
    prompts = [check_prompt(r, i, column, path) for i, r in enumerate(rows)]
    if len(prompts) < 2:
        raise UsageError(f"{path} holds {len(prompts)} prompt; PPO needs at least 2 (some are held out for evaluation)")
    n_eval = min(eval_prompts, max(1, len(prompts) // 10))
    train, evals = prompts[:-n_eval], prompts[-n_eval:]
    texts = [p if isinstance(p, str) else " ".join(m["content"] for m in p) for p in evals]
    parsed = [world.parse_problem(t) for t in texts]
    return Prompts(train, evals, parsed if all(parsed) else None, f"{path}: {len(train)} training prompts, {len(evals)} held out")


def as_user_turns(prompts: list) -> list:
    """Plain strings become one user message (as `llm sft` trains on them); message lists pass through."""
    return [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Prompt indices of the global batch for iteration `step`: items [step·G, (step+1)·G) of an
    endless stream of seeded per-epoch permutations. A pure function of (seed, step): resuming needs only the step."""
    out: list[int] = []
    pos = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos + len(out), n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset : offset + global_batch - len(out)])
    return out
