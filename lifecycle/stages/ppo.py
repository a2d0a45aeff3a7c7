"""`llm ppo`: RLHF with PPO against a reward model, our own loop on Accelerate.

Why our own loop: TRL 1.x ships no PPO trainer, and PPO for language models is
short enough to read in one file when the math lives elsewhere (lifecycle/rl.py,
pure functions with hand-checked tests). docs/ppo.md gives the equations and
where each one lives.

Four roles (Ouyang et al. 2022, InstructGPT sec. 3.5; Ziegler et al. 2019):
  actor      π      initialised from the SFT policy; trained
  reference  π_ref  the SFT policy, frozen (with --lora/--qlora: the actor with its adapter disabled)
  reward     r_φ    the reward model, frozen: one score per (prompt, response)
  critic     V      a per-token value head, initialised from the reward model; trained

Read `run` top to bottom:
  0. check inputs (no weights loaded), prompts, roles, the reward-model quality gate, resume
  then once per iteration:
  1. generate the trajectory (each process samples its own share of the prompts)
  2. score: reward model on prompt+response, normalised; a penalty for responses with no EOS
  3. KL-shaped rewards: -β·KL per token, the score on the last token
  4. GAE advantages (whitened) and returns
  5. PPO epochs over minibatches: clipped surrogate, clipped value loss, gradient clipping, early stop on approx KL
  6. metrics, watchdog, held-out evaluation, checkpoint
  7. final evaluation and the artifact: the actor (merged if LoRA) + OUT/critic

Distribution: Accelerate wraps actor and critic in DDP (or, with a shared base,
the one module that holds both), so gradients are all-reduced; every process generates its own rollouts from its own slice of
each global prompt batch, with its own sampling seed. Scalars that decide
control flow (normalisation stats, KL for the controller, early stop, stop
requests) are reduced across processes so that all of them take the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lifecycle.config import PPOConfig, to_dict
from lifecycle.errors import Interrupted, UsageError

# A scripted reward for tests and experiments: (rendered prompts, responses as generate.Sample) -> scores.
ScoreFn = Callable[[list, list], list]


# ---------------------------------------------------------------------------
# 0a. Inputs, checked before anything heavy is imported
# ---------------------------------------------------------------------------
def _num_labels(path: str) -> int | None:
    """Labels of a sequence classifier from its config.json (None when unknown, e.g. a hub id)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return cfg.get("num_labels", 2)  # transformers' default is 2 labels


def _check_reward_like(path: str, flag: str) -> dict:
    from lifecycle.artifacts import REWARD_MODEL, check_artifact

    info = check_artifact(path, REWARD_MODEL, flag)
    if not info.hub:
        n = _num_labels(info.path)
        if n != 1:
            raise UsageError(
                f"{flag} {path} is a sequence classifier with {n} labels, but a reward model has exactly one "
                f"(num_labels=1, one score per sequence); train one with `llm reward --base DIR --out DIR`"
            )
    return info


def check_inputs(cfg: PPOConfig) -> dict:
    """Policy, reward model, critic source and prompts, all checked before any weights load."""
    from lifecycle.artifacts import CAUSAL_LM, REWARD_MODEL, check_artifact

    try:
        policy = check_artifact(cfg.policy, CAUSAL_LM, "--policy")
    except UsageError:
        # The most common slip: the two directories given the other way round.
        try:
            check_artifact(cfg.policy, REWARD_MODEL, "--policy")
            check_artifact(cfg.reward, CAUSAL_LM, "--reward")
        except UsageError:
            raise
        raise UsageError(
            f"--policy {cfg.policy} is a reward model and --reward {cfg.reward} is a causal LM: the two look swapped; "
            f"pass --policy {cfg.reward} --reward {cfg.policy}"
        ) from None
    reward = _check_reward_like(cfg.reward, "--reward")
    critic = None
    if cfg.critic not in ("reward", "policy"):
        critic = _check_reward_like(cfg.critic, "critic")
    train, evals, problems, about = load_prompts(cfg)
    return {"policy": policy, "reward": reward, "critic": critic, "train": train, "eval": evals,
            "problems": problems, "about": about}


def _check_prompt(row: Any, i: int, column: str, source: str):
    if column not in row:
        cols = ", ".join(sorted(row)) or "none"
        raise UsageError(f"{source} row {i + 1} has no {column!r} column (columns: {cols}); pass --set prompt_column=NAME")
    p = row[column]
    if isinstance(p, str):
        if not p.strip():
            raise UsageError(f"{source} row {i + 1}: the prompt is empty; remove the row")
        return p
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        return p
    raise UsageError(f"{source} row {i + 1}: {column!r} must be a string or a list of {{role, content}} messages, got {type(p).__name__}")


def load_prompts(cfg: PPOConfig) -> tuple[list, list, list | None, str]:
    """(training prompts, held-out prompts, held-out world problems or None, description).

    A prompt is a string or a list of chat messages. On the built-in world the
    held-out prompts are its held-out problems, so gold accuracy can be measured;
    user prompts whose held-out part all parse as world problems get it too.
    """
    from lifecycle.data import world

    if not cfg.prompts:
        train = [r["prompt"] for r in world.ppo_prompts(cfg.world_prompts, seed=cfg.seed)]
        problems = world.heldout_problems(min(cfg.eval_prompts, world.N_HELDOUT))
        evals = [[world.user(p.question)] for p in problems]
        return train, evals, problems, f"built-in world: {len(train)} training prompts, {len(evals)} held-out problems"
    from lifecycle.data.files import read_records

    rows = read_records(cfg.prompts, cfg.prompt_column)
    prompts = [_check_prompt(r, i, cfg.prompt_column, cfg.prompts) for i, r in enumerate(rows)]
    if len(prompts) < 2:
        raise UsageError(f"{cfg.prompts} holds {len(prompts)} prompt; PPO needs at least 2 (some are held out for evaluation)")
    n_eval = min(cfg.eval_prompts, max(1, len(prompts) // 10))
    train, evals = prompts[:-n_eval], prompts[-n_eval:]
    texts = [p if isinstance(p, str) else " ".join(m["content"] for m in p) for p in evals]
    parsed = [world.parse_problem(t) for t in texts]
    problems = parsed if all(parsed) else None
    return train, evals, problems, f"{cfg.prompts}: {len(train)} training prompts, {len(evals)} held out"


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


# ---------------------------------------------------------------------------
# 0b. The rollout container
# ---------------------------------------------------------------------------
@dataclass
class Rollout:
    """One process's batch of experience. B episodes; P prompt positions (left-padded); T response positions
    (right-padded after EOS). Position t of a response is the action a_t; the state s_t is everything before it."""

    prompt_ids: Any  # (B, P) long, prompt tokens, left-padded with pad
    prompt_mask: Any  # (B, P) long, 1 on real prompt tokens
    response_ids: Any  # (B, T) long, sampled tokens, EOS included when emitted, then pad
    response_mask: Any  # (B, T) float, 1 on response tokens up to and including EOS
    ended: Any  # (B,) bool, the response emitted EOS
    logprobs: Any  # (B, T) log π_old(a_t|s_t), the actor at sampling time
    ref_logprobs: Any  # (B, T) log π_ref(a_t|s_t)
    values: Any  # (B, T) V_old(s_t), the critic at sampling time
    scores: Any  # (B,) raw reward-model score of prompt+response
    rewards: Any  # (B, T) shaped rewards: -β·KL_t, plus the normalised score on the last token
    kl: Any  # (B, T) per-token KL estimate log π_old - log π_ref (zero on padding)
    advantages: Any  # (B, T) GAE advantages, whitened
    returns: Any  # (B, T) GAE returns, the critic's targets

    def select(self, idx) -> "Rollout":
        """The episodes `idx` (a (b,) index tensor), every field sliced on its first dimension."""
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def model_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """(input_ids, attention_mask, position_ids), each (B, P+T), for prompt+response.

    Position ids count real tokens only, as generation with left padding does, so a
    forward pass sees the same positions the sampler saw.
    """
    import torch

    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask.long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def response_logits(model, r: Rollout):
    """Logits that predict each response token: (B, T, V), from positions P-1 .. P+T-2."""
    ids, mask, pos = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    T = r.response_ids.shape[1]
    # Only the last T+1 positions go through the output layer (the prompt's own predictions are never used).
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, :-1]


# ---------------------------------------------------------------------------
# 0c. The critic: a sequence classifier read at every position
# ---------------------------------------------------------------------------
def _value_model_class():
    import torch

    class ValueModel(torch.nn.Module):
        """V(s_t) = head(h_t): a one-label sequence classifier whose head is applied to every position.

        Initialised from the reward model, the critic starts out predicting the
        reward model's score at the end of the response (InstructGPT sec. 3.5);
        saved, it is a plain AutoModelForSequenceClassification directory.
        """

        def __init__(self, seqcls):
            super().__init__()
            self.model = seqcls  # may be a peft model

        def forward(self, input_ids, attention_mask, position_ids):
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            body = getattr(base, base.base_model_prefix)
            h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state  # (B, L, H)
            return base.score(h.to(base.score.weight.dtype)).squeeze(-1).float()  # (B, L)

    return ValueModel


def _values_at_responses(values, r: Rollout):
    """(B, P+T) per-position values -> (B, T): V(s_t) is read where a_t is predicted, positions P-1 .. P+T-2."""
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    return values[:, P - 1 : P + T - 1]


# ---------------------------------------------------------------------------
# 0d. The four roles behind one interface
# ---------------------------------------------------------------------------
class Roles:
    """Actor, reference, reward model and critic as separate models (the reference is the actor with its
    adapter disabled under --lora/--qlora). The loop only calls these methods; `SharedRoles` implements
    them on one base model with three adapters."""

    def __init__(self, actor, ref, reward, critic, *, tok, reward_tok, same_tok: bool, critic_source: str):
        self.actor, self.ref, self.reward, self.critic = actor, ref, reward, critic
        self.tok, self.reward_tok, self.same_tok, self.critic_source = tok, reward_tok, same_tok, critic_source
        self.trained = [actor, critic]  # the modules Accelerate wraps (DDP)

    # -- setup -----------------------------------------------------------------
    def actor_params(self) -> list:
        return [p for p in self.actor.parameters() if p.requires_grad]

    def critic_params(self) -> list:
        return [p for p in self.critic.parameters() if p.requires_grad]

    def prepare(self, acc, opt_actor, opt_critic):
        """Wrap the trained modules (DDP across processes), move the frozen ones; returns the optimizers."""
        self.actor, self.critic, opt_actor, opt_critic = acc.prepare(self.actor, self.critic, opt_actor, opt_critic)
        self.trained = [self.actor, self.critic]
        for m in (self.ref, self.reward):
            if m is not None:
                m.to(acc.device)
        self.actor_u, self.critic_u = acc.unwrap_model(self.actor), acc.unwrap_model(self.critic)
        return opt_actor, opt_critic

    def describe(self) -> str:
        from lifecycle.modeling import describe_trainable

        return f"actor: {describe_trainable(self.actor)} | critic from {self.critic_source}: {describe_trainable(self.critic)}"

    # -- forward passes ------------------------------------------------------------
    def generation_model(self):
        return self.actor_u

    def logits(self, r: Rollout):
        """Actor logits at the response positions, (B, T, V); no DDP wrapper (no-grad passes)."""
        return response_logits(self.actor_u, r)

    def ref_logits(self, r: Rollout):
        if self.ref is not None:
            return response_logits(self.ref, r)
        with self.actor_u.disable_adapter():  # the reference is the base under the actor's adapter
            return response_logits(self.actor_u, r)

    def values(self, r: Rollout):
        ids, mask, pos = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
        return _values_at_responses(self.critic_u(ids, mask, pos), r)

    def train_forward(self, u: Rollout):
        """(logits (B, T, V), values (B, T)) through the wrapped modules, for one backward of both losses."""
        ids, mask, pos = model_inputs(u.prompt_ids, u.prompt_mask, u.response_ids, u.response_mask)
        return response_logits(self.actor, u), _values_at_responses(self.critic(ids, mask, pos), u)

    def scores(self, ids, mask):
        """Reward-model scores (B,) of prompt+response token ids (the policy's tokenizer)."""
        from lifecycle.reward_model import score_tokens

        return score_tokens(self.reward, ids, mask)

    def score_texts(self, prompts: list, responses: list[str]) -> list[float]:
        from lifecycle.reward_model import score

        return score(self.reward, self.reward_tok, prompts, responses)

    # -- output -----------------------------------------------------------------------
    def digest_models(self) -> tuple:
        return self.actor_u, self.critic_u

    def final_models(self, cfg: PPOConfig, policy_path: str, tmp: Path):
        """(actor as a plain causal LM, critic as a plain one-label classifier, extra artifact dirs)."""
        from lifecycle.modeling import REWARD_HEAD, merge_adapter

        extra = {}
        actor = self.actor_u
        if cfg.use_peft:  # merged into a fresh full-precision copy of the policy (QLoRA trained on a 4-bit one)
            actor.save_pretrained(tmp / "actor_adapter")
            extra["adapter"] = lambda d, a=actor: a.save_pretrained(d)
            actor = merge_adapter(policy_path, str(tmp / "actor_adapter"))
        seqcls = self.critic_u.model
        if hasattr(seqcls, "peft_config"):
            seqcls.save_pretrained(tmp / "critic_adapter")
            seqcls = merge_adapter(self.critic_source, str(tmp / "critic_adapter"), head=REWARD_HEAD,
                                   pad_token_id=self.tok.pad_token_id)
        return actor, seqcls, extra


class SharedRoles(Roles):
    """All four roles on one (optionally 4-bit) copy of the policy's weights.

    Used with --lora/--qlora when the reward model is a LoRA adapter over the
    policy itself: the base carries three adapters (peft multi-adapter) —
    "actor" (trains), "critic" (trains; starts as a copy of the reward adapter)
    and "reward" (frozen) — plus two small heads, the reward model's score head
    (frozen) and the critic's value head (trains, starts as a copy of it). The
    reference is the base with every adapter disabled. One module holds it all,
    so one forward gives both the actor's logits and the critic's values and
    DDP wraps it once.
    """

    TRAINED = ("actor", "critic")

    def __init__(self, peft_model, reward_head, value_head, *, tok, critic_source: str):
        import torch

        class Shared(torch.nn.Module):
            def __init__(self, peft_model, reward_head, value_head, owner):
                super().__init__()
                self.peft, self.reward_head, self.value_head = peft_model, reward_head, value_head
                self._owner = [owner]  # not a submodule

            def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
                """The training forward: the actor's logits and the critic's values, (B, K, V) and (B, L)."""
                own = self._owner[0]
                own.use("actor")
                logits = self.peft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, logits_to_keep=logits_to_keep).logits
                own.use("critic")
                h = own.hidden(input_ids, attention_mask, position_ids)
                return logits, self.value_head(h).squeeze(-1).float()

        self.module = Shared(peft_model, reward_head, value_head, self)  # always the unwrapped module
        self.shared = self.module  # what the training forward calls: DDP-wrapped after prepare
        self.tok = self.reward_tok = tok
        self.same_tok, self.critic_source = True, critic_source
        self.ref = self.reward = None
        self.trained = [self.shared]

    # -- adapters ---------------------------------------------------------------------
    def use(self, name: str) -> None:
        """Make one adapter active without changing what trains (peft's set_adapter would freeze the others)."""
        peft = self.module.peft
        peft.base_model.set_adapter(name)
        for n, p in peft.named_parameters():
            if ".lora_" in n:
                p.requires_grad_(any(f".{a}." in n or n.endswith(f".{a}") for a in self.TRAINED))

    def hidden(self, ids, mask, pos):
        """Last hidden states (B, L, H) of the base under the active adapter."""
        body = self.module.peft.get_base_model()
        body = getattr(body, body.base_model_prefix)
        return body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    # -- setup ------------------------------------------------------------------------
    def actor_params(self) -> list:
        return [p for n, p in self.module.peft.named_parameters() if ".lora_" in n and ".actor" in n]

    def critic_params(self) -> list:
        return [p for n, p in self.module.peft.named_parameters() if ".lora_" in n and ".critic" in n] + \
            list(self.module.value_head.parameters())

    def prepare(self, acc, opt_actor, opt_critic):
        self.shared, opt_actor, opt_critic = acc.prepare(self.module, opt_actor, opt_critic)
        self.trained = [self.shared]
        return opt_actor, opt_critic

    def describe(self) -> str:
        from lifecycle.modeling import count_params

        _, total = count_params(self.module.peft.get_base_model())
        n_a, n_c = sum(p.numel() for p in self.actor_params()), sum(p.numel() for p in self.critic_params())
        return (f"one shared base ({total:,} parameters) for all four roles: adapters actor ({n_a:,} trainable), "
                f"critic ({n_c:,} trainable, from {self.critic_source}), reward (frozen); reference = adapters disabled")

    # -- forward passes -------------------------------------------------------------------
    def generation_model(self):
        self.use("actor")
        return self.module.peft

    def logits(self, r: Rollout):
        self.use("actor")
        return response_logits(self.module.peft, r)

    def ref_logits(self, r: Rollout):
        with self.module.peft.disable_adapter():
            return response_logits(self.module.peft, r)

    def values(self, r: Rollout):
        ids, mask, pos = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
        self.use("critic")
        return _values_at_responses(self.module.value_head(self.hidden(ids, mask, pos)).squeeze(-1).float(), r)

    def train_forward(self, u: Rollout):
        ids, mask, pos = model_inputs(u.prompt_ids, u.prompt_mask, u.response_ids, u.response_mask)
        T = u.response_ids.shape[1]
        logits, values = self.shared(ids, mask, pos, T + 1)
        return logits[:, :-1], _values_at_responses(values, u)

    def scores(self, ids, mask):
        import torch

        self.use("reward")
        mask = mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        h = self.hidden(ids, mask, pos)  # (B, L, H)
        last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # (B,) last real token
        return self.module.reward_head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()

    # -- output ---------------------------------------------------------------------------
    def digest_models(self) -> tuple:
        return self.module.peft, self.module.value_head

    def final_models(self, cfg: PPOConfig, policy_path: str, tmp: Path):
        import torch

        from lifecycle.modeling import REWARD_HEAD, load_for_training, merge_adapter

        peft = self.module.peft
        peft.save_pretrained(tmp / "adapters", selected_adapters=["actor", "critic"])
        actor = merge_adapter(policy_path, str(tmp / "adapters" / "actor"))
        # The critic's LoRA carries no head here (the value head lives beside it): merge it into a causal LM's
        # backbone, then read that backbone as a one-label classifier and give it the value head.
        conf = tmp / "adapters" / "critic" / "adapter_config.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "modules_to_save": None, "task_type": "CAUSAL_LM"}))
        merge_adapter(policy_path, str(tmp / "adapters" / "critic")).save_pretrained(tmp / "critic_backbone")
        critic = load_for_training(str(tmp / "critic_backbone"), dataclasses.replace(cfg, lora=False, qlora=False),
                                   head=REWARD_HEAD, pad_token_id=self.tok.pad_token_id)
        with torch.no_grad():
            critic.score.weight.copy_(self.module.value_head.weight.to(critic.score.weight.dtype))
        import shutil

        extra = {"adapter": lambda d: shutil.copytree(tmp / "adapters" / "actor", d, dirs_exist_ok=True)}
        return actor, critic, extra


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id


def shared_reward_adapter(cfg: PPOConfig, inputs: dict) -> str | None:
    """The reward adapter directory when all four roles can share one base, else None.

    That is: --lora/--qlora with share_base, and the reward artifact holds a
    LoRA adapter (OUT/adapter of `llm reward --lora`) trained over the very
    weights of the policy (its manifest's backbone digest equals the policy's).
    """
    from lifecycle.artifacts import artifact_digest

    if not (cfg.use_peft and cfg.share_base) or inputs["reward"].hub or inputs["policy"].hub:
        return None
    adapter = Path(inputs["reward"].path) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        return None
    m = inputs["reward"].manifest or {}
    backbone = m.get("init_from") or m.get("parent") or {}
    if backbone.get("digest") and backbone["digest"] == artifact_digest(Path(inputs["policy"].path)):
        return str(adapter)
    return None


def load_roles(cfg: PPOConfig, inputs: dict, say) -> Roles:
    """Load the four roles: separately, or on one shared base (see `SharedRoles`)."""
    import torch

    from lifecycle.modeling import REWARD_HEAD, load_causal_lm, load_for_training
    from lifecycle.reward_model import load_reward_model
    from lifecycle.tokenizer import load_tokenizer

    policy_path, reward_path = inputs["policy"].path, inputs["reward"].path
    tok = load_tokenizer(policy_path)
    reward_tok = load_tokenizer(reward_path)
    same_tok = _same_tokenizer(tok, reward_tok)

    shared = shared_reward_adapter(cfg, inputs) if same_tok and cfg.critic in ("reward", "policy") else None
    if shared:
        return _load_shared(cfg, policy_path, reward_path, shared, tok)
    if not same_tok:
        say("note: the policy and the reward model use different tokenizers; responses reach the reward model as text "
            "(decoded, then re-encoded with its tokenizer)")

    # actor (and the reference)
    actor = load_for_training(policy_path, cfg)
    ref = None if cfg.use_peft else _frozen(load_causal_lm(policy_path))

    # reward model
    reward = _frozen(load_reward_model(reward_path))
    if reward.config.num_labels != 1:
        raise UsageError(f"--reward {cfg.reward} has {reward.config.num_labels} labels; a reward model has exactly one")
    if reward.config.pad_token_id is None:
        reward.config.pad_token_id = reward_tok.pad_token_id

    # critic
    source = {"reward": reward_path, "policy": policy_path}.get(cfg.critic, getattr(inputs["critic"], "path", None))
    if cfg.critic == "reward" and not same_tok:
        say("note: the critic must read the policy's tokens; it starts from the policy instead of the reward model")
        source = policy_path
    peft_opts = dataclasses.replace(cfg, lora=cfg.critic_lora and cfg.lora, qlora=cfg.critic_lora and cfg.qlora)
    seqcls = load_for_training(source, peft_opts, head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
    base = seqcls.get_base_model() if hasattr(seqcls, "get_base_model") else seqcls
    if source == policy_path:  # a new head: start every value at 0
        torch.nn.init.zeros_(base.score.weight)
    if base.config.vocab_size < len(tok):
        raise UsageError(f"the critic ({source}) has a vocabulary of {base.config.vocab_size} but the policy's tokenizer has "
                         f"{len(tok)} tokens; set critic=policy")
    critic = _value_model_class()(seqcls)
    return Roles(actor, ref, reward, critic, tok=tok, reward_tok=reward_tok, same_tok=same_tok, critic_source=source)


def _load_shared(cfg: PPOConfig, policy_path: str, reward_path: str, reward_adapter: str, tok) -> SharedRoles:
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file

    from lifecycle.modeling import lora_config, load_for_training

    base = load_for_training(policy_path, dataclasses.replace(cfg, lora=False, qlora=cfg.qlora, dora=False))
    if hasattr(base, "peft_config"):  # load_for_training adds adapters only when asked; be sure
        base = base.get_base_model()
    model = get_peft_model(base, lora_config(cfg), adapter_name="actor")
    model.load_adapter(reward_adapter, adapter_name="reward", is_trainable=False)
    # The reward model's score head: from the merged reward artifact (the adapter's copy has the same values).
    head_w = load_file(str(Path(reward_path) / "model.safetensors"))["score.weight"]
    hidden = head_w.shape[1]
    reward_head = torch.nn.Linear(hidden, 1, bias=False)
    value_head = torch.nn.Linear(hidden, 1, bias=False)
    with torch.no_grad():
        reward_head.weight.copy_(head_w.float())
        if cfg.critic == "reward":
            value_head.weight.copy_(head_w.float())
        else:
            value_head.weight.zero_()
    reward_head.requires_grad_(False)
    if cfg.critic == "reward":  # the critic's adapter starts as a trainable copy of the reward adapter
        model.load_adapter(reward_adapter, adapter_name="critic", is_trainable=True)
    else:
        model.add_adapter("critic", lora_config(cfg))
    roles = SharedRoles(model, reward_head, value_head, tok=tok,
                        critic_source=reward_path if cfg.critic == "reward" else policy_path)
    roles.use("actor")
    return roles


# ---------------------------------------------------------------------------
# 0e. --explain: the batch hierarchy and the memory of the four roles
# ---------------------------------------------------------------------------
def _param_count(path: str, head: str) -> tuple[int, Any]:
    """Parameters of the model at `path`, counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    conf = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        if head == "causal":
            m = AutoModelForCausalLM.from_config(conf)
        else:
            conf.num_labels = 1
            m = AutoModelForSequenceClassification.from_config(conf)
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n, conf


def explain(cfg: PPOConfig, inputs: dict, processes: int) -> str:
    """The batch hierarchy of one PPO iteration and the memory estimate of the four roles."""
    W = processes
    G, mb, micro = cfg.prompts_per_rollout, cfg.minibatch_size, cfg.micro_batch_size
    local, mb_local = G // W, mb // W
    micro = min(micro, mb_local) or 1
    n_mb = G // mb
    steps = cfg.total_steps
    seq = prompt_tokens(cfg, inputs) + cfg.max_new_tokens
    lines = [
        "PPO batch hierarchy (one iteration):",
        f"  rollout batch     {G} prompts ({local} per process x {W} process{'es' if W > 1 else ''}), 1 response each "
        f"of at most {cfg.max_new_tokens} tokens -> {G} episodes (sequences up to {seq} tokens)",
        f"  PPO epochs        {cfg.ppo_epochs} passes over the batch",
        f"  minibatches       {n_mb} per epoch of {mb} episodes ({mb_local} per process)",
        f"  micro-batches     {-(-mb_local // micro)} per minibatch per process, of up to {micro} episodes (gradient accumulation)",
        f"  optimizer steps   {cfg.ppo_epochs * n_mb} per iteration for the actor and for the critic "
        f"(fewer if approx KL stops an epoch early)",
        f"  run               {steps} iterations -> {steps * G:,} episodes, {steps * cfg.ppo_epochs * n_mb:,} optimizer steps",
        "",
    ]
    est = memory_estimate(cfg, inputs, W, micro, seq)
    lines.append(est if isinstance(est, str) else est.table())
    return "\n".join(lines)


def prompt_tokens(cfg: PPOConfig, inputs: dict, sample: int = 2000) -> int:
    """Longest rendered prompt in tokens (over the first `sample` training and held-out prompts)."""
    from lifecycle.generate import render_prompts
    from lifecycle.tokenizer import load_tokenizer

    tok = load_tokenizer(inputs["policy"].path)
    texts = render_prompts(tok, inputs["train"][:sample] + inputs["eval"][:sample])
    return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def memory_estimate(cfg: PPOConfig, inputs: dict, processes: int, micro: int, seq: int, check: bool = False):
    """lifecycle.memory's estimate for stage "ppo" (an Estimate), or parameter-count figures (a str) when the
    estimator cannot model this architecture. With check=True it refuses a run that does not fit (unless --force)."""
    from transformers import AutoConfig

    dtype = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "fp32")
    method = "qlora" if cfg.qlora else ("lora" if cfg.lora else "full")
    conf = AutoConfig.from_pretrained(inputs["policy"].path).to_dict()
    try:
        from lifecycle import memory

        kw = dict(stage="ppo", method=method, batch_size=micro, seq_len=seq, gpus=processes, lora_r=cfg.lora_r, dtype=dtype)
        if check:
            return memory.check_fits(conf, force=cfg.force, **kw)
        import torch

        return memory.estimate(conf, device="cuda" if torch.cuda.is_available() else "cpu", **kw)
    except (ImportError, AttributeError):
        pass  # no estimator in this version
    except UsageError:
        if check:
            raise
    return _param_count_memory(cfg, inputs, micro, seq)


def _param_count_memory(cfg: PPOConfig, inputs: dict, micro: int, seq: int) -> str:
    n_pol, pconf = _param_count(inputs["policy"].path, "causal")
    n_rm, _ = _param_count(inputs["reward"].path, "reward")
    crit_path = {"reward": inputs["reward"].path, "policy": inputs["policy"].path}.get(cfg.critic, getattr(inputs["critic"], "path", None))
    n_cr, _ = _param_count(crit_path, "reward")
    fp32 = 4
    base_b = 0.5 if cfg.qlora else fp32  # 4-bit NF4 stores half a byte per weight (plus small scales)
    r, hidden = cfg.lora_r, getattr(pconf, "hidden_size", None) or getattr(pconf, "n_embd", 0)
    layers = getattr(pconf, "num_hidden_layers", None) or getattr(pconf, "n_layer", 0)
    lora_params = 2 * r * hidden * 7 * layers if cfg.use_peft else 0  # rough: ~7 adapted matrices per layer
    train_actor = lora_params if cfg.use_peft else n_pol
    train_critic = lora_params if (cfg.use_peft and cfg.critic_lora) else n_cr
    roles = {  # weights + gradients + two Adam moments (fp32) for what trains
        "actor": n_pol * base_b + train_actor * fp32 * 3 + (train_actor * fp32 if cfg.use_peft else 0),
        "reference": 0 if cfg.use_peft else n_pol * fp32,
        "reward": n_rm * (base_b if cfg.qlora else fp32),
        "critic": n_cr * (base_b if (cfg.qlora and cfg.critic_lora) else fp32) + train_critic * fp32 * 3,
    }
    vocab = getattr(pconf, "vocab_size", 0)
    act = micro * seq * (hidden * layers * 16 + vocab * 2) * fp32  # rough: ~16 saved values per hidden unit per layer + logits
    mib = lambda b: b / 2**20  # noqa: E731
    lines = ["Memory per process (parameter-count estimate; fp32" + (", 4-bit base" if cfg.qlora else "") + "):"]
    lines += [f"  {k:<11} {mib(v):10.1f} MiB" for k, v in roles.items()]
    lines.append(f"  {'activations':<11} {mib(act):10.1f} MiB  (one micro-batch of {micro} x {seq} tokens, rough)")
    lines.append(f"  {'total':<11} {mib(sum(roles.values()) + act):10.1f} MiB")
    lines.append(f"  parameters: policy {n_pol:,}, reward {n_rm:,}, critic {n_cr:,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def run(cfg: PPOConfig, score_fn: ScoreFn | None = None) -> Path | None:
    # -- 0. check inputs, before any weights load ------------------------------------------
    from lifecycle import training

    t_wall = time.perf_counter()
    out = Path(cfg.out)
    ck = training.require_checkpoint(out) if cfg.resume else None
    inputs = check_inputs(cfg)

    import torch
    from accelerate.utils import set_seed

    from lifecycle import rl
    from lifecycle.generate import generate_batch, render_prompts
    from lifecycle.watchdog import Watchdog

    _quiet()
    acc = training.make_accelerator(mixed_precision=cfg.mixed_precision,
                                    log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=str(out))
    say = acc.print
    W, rank = acc.num_processes, acc.process_index
    G = cfg.prompts_per_rollout
    if G % W or cfg.minibatch_size % W:
        raise UsageError(f"prompts_per_rollout={G} and minibatch_size={cfg.minibatch_size} must both divide by the "
                         f"{W} processes")
    B, MB = G // W, cfg.minibatch_size // W  # episodes per process: per rollout, per minibatch
    micro = min(cfg.micro_batch_size, MB)

    if cfg.explain:
        if acc.is_main_process:
            print(explain(cfg, inputs, W))
        return None

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    say(f"prompts: {inputs['about']}")
    est = memory_estimate(cfg, inputs, W, micro, prompt_tokens(cfg, inputs) + cfg.max_new_tokens, check=True)
    if not isinstance(est, str):
        say(f"memory estimate: {est.total_bytes / 2**20:,.1f} MiB per process at its peak ({est.peak_phase}); --explain shows the rows")
    set_seed(cfg.seed)  # identical initialisation on every process
    roles = load_roles(cfg, inputs, say)
    tok = roles.tok
    for m in roles.trained:
        m.eval()  # no dropout anywhere: the ratio π/π_old must be exactly 1 before the first update
    say(roles.describe())
    say(f"each iteration: {G} prompts ({B} per process x {W}) -> {cfg.ppo_epochs} epochs x {G // cfg.minibatch_size} "
        f"minibatches of {cfg.minibatch_size} ({-(-MB // micro)} micro-batch(es) of {micro} per process); --explain shows memory")

    opt_actor = torch.optim.AdamW(roles.actor_params(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_critic = torch.optim.AdamW(roles.critic_params(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
    opt_actor, opt_critic = roles.prepare(acc, opt_actor, opt_critic)
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses

    pad = tok.pad_token_id
    if cfg.chat_template and tok.chat_template:  # plain strings become a user turn, as `llm sft` trains them
        for k in ("train", "eval"):
            inputs[k] = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in inputs[k]]
    train_prompts = render_prompts(tok, inputs["train"])
    eval_prompts = render_prompts(tok, inputs["eval"])
    raw_train, raw_eval = inputs["train"], inputs["eval"]
    problems = inputs["problems"]
    temp = cfg.temperature

    # -- helpers that close over the roles ----------------------------------------------------
    def generate(prompts: list[str], greedy: bool = False) -> list:
        return generate_batch(roles.generation_model(), tok, prompts, max_new_tokens=cfg.max_new_tokens,
                              temperature=0.0 if greedy else temp, top_k=cfg.top_k, top_p=cfg.top_p,
                              batch_size=max(len(prompts), 1))

    def tensors(prompts: list[str], samples: list) -> tuple:
        """Prompt (left-padded) and response (right-padded) tensors for a list of samples."""
        old = tok.padding_side
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = old
        T = max(len(s.token_ids) for s in samples)
        resp = torch.full((len(samples), T), pad, dtype=torch.long)
        rmask = torch.zeros((len(samples), T))
        for i, s in enumerate(samples):
            resp[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
            rmask[i, : len(s.token_ids)] = 1
        ended = torch.tensor([s.ended for s in samples])
        d = acc.device
        return enc["input_ids"].to(d), enc["attention_mask"].to(d), resp.to(d), rmask.to(d), ended.to(d)

    def rm_scores(raw_prompts: list, prompts: list[str], samples: list, r: Rollout):
        """The reward model's score of each prompt+response, (B,)."""
        if score_fn is not None:
            return torch.tensor(score_fn(prompts, samples), dtype=torch.float32, device=acc.device)
        if roles.same_tok:
            ids, mask, _ = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
            return roles.scores(ids, mask)
        # Different tokenizers: hand over through text, re-rendered with the reward model's own template.
        return torch.tensor(roles.score_texts(raw_prompts, [s.text for s in samples]), dtype=torch.float32,
                            device=acc.device)

    def partial_rollout(raw: list, prompts: list[str], samples: list) -> Rollout:
        pi, pm, ri, rm, ended = tensors(prompts, samples)
        z = torch.zeros_like(rm)
        return Rollout(pi, pm, ri, rm, ended, z, z, z, torch.zeros(len(samples), device=acc.device), z, z, z, z)

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out: greedy responses scored by the RM (and the gold checker), and KL on sampled responses.

        Each process takes every W-th held-out prompt; sums are reduced across processes.
        The KL is exact per token (a sum over the vocabulary), summed along sampled
        responses: an unbiased, low-variance estimate of KL(π(y|x) || π_ref(y|x)) by
        the chain rule of KL.
        """
        idx = list(range(rank, len(eval_prompts), W))
        prompts = [eval_prompts[i] for i in idx]
        raw = [raw_eval[i] for i in idx]
        sums = torch.zeros(8, device=acc.device)  # score, gold, n, kl, length, ended, gold on carry problems, carry problems
        if prompts:
            greedy = generate(prompts, greedy=True)
            r = partial_rollout(raw, prompts, greedy)
            sums[0] = rm_scores(raw, prompts, greedy, r).sum()
            if problems is not None:
                from lifecycle.data import world

                right = [world.gold_check(problems[i].question, s.text, s.ended) for i, s in zip(idx, greedy)]
                carry = [problems[i].has_carry for i in idx]
                sums[1], sums[6], sums[7] = sum(right), sum(r and c for r, c in zip(right, carry)), sum(carry)
            sums[2] = len(prompts)
            sums[4] = r.response_mask.sum()
            sums[5] = r.ended.float().sum()
            sampled = generate(prompts)
            r = partial_rollout(raw, prompts, sampled)
            lp = torch.log_softmax(roles.logits(r).float() / temp, -1)
            lq = torch.log_softmax(roles.ref_logits(r).float() / temp, -1)
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

    # -- 0f. the reward-model quality gate ----------------------------------------------------
    if ck is None and score_fn is None:
        rm_manifest = inputs["reward"].manifest or {}
        rm_acc = (rm_manifest.get("metrics") or {}).get("eval_accuracy")
        # Two sampled responses per prompt; the length bias is measured within each prompt's pair (score
        # difference against length difference), so prompts whose answers are simply longer do not count.
        n_gate = max(1, cfg.gate_samples // (2 * W))
        gate_idx = batch_indices(0, n_gate * W, len(train_prompts), cfg.seed + 1)[rank * n_gate : (rank + 1) * n_gate]
        gate_idx = gate_idx + gate_idx
        gp = [train_prompts[i] for i in gate_idx]
        with torch.no_grad():
            gs = generate(gp)
            gr = partial_rollout([raw_train[i] for i in gate_idx], gp, gs)
            sc = rm_scores([raw_train[i] for i in gate_idx], gp, gs, gr)
        ln = gr.response_mask.sum(1)
        pairs = torch.stack([sc[:n_gate], sc[n_gate:], ln[:n_gate], ln[n_gate:]], 1)  # (n, 4) per prompt
        both = acc.gather(pairs).cpu()
        corr_all = rl.pearson(both[:, :2].flatten().tolist(), both[:, 2:].flatten().tolist())
        corr = rl.pearson((both[:, 0] - both[:, 1]).tolist(), (both[:, 2] - both[:, 3]).tolist())
        problems_found = []
        if rm_acc is None:
            say("reward-model gate: its manifest records no eval_accuracy; its quality is unknown")
        elif rm_acc < cfg.gate_min_accuracy:
            problems_found.append(f"held-out pairwise accuracy {rm_acc:.3f} < {cfg.gate_min_accuracy}")
        if abs(corr) > cfg.gate_max_length_corr:
            problems_found.append(f"between two responses to the same prompt its score follows their length "
                                  f"(r = {corr:+.2f}, limit ±{cfg.gate_max_length_corr})")
        acc_txt = f"{rm_acc:.3f}" if rm_acc is not None else "unknown"
        say(f"reward-model gate: pairwise accuracy {acc_txt}; score-length correlation {corr:+.2f} within prompts "
            f"({corr_all:+.2f} over all {2 * len(both)} samples)")
        if problems_found:
            msg = "reward-model quality gate: " + "; ".join(problems_found)
            if cfg.strict:
                raise UsageError(msg + "; train a better reward model, or drop --strict to go on anyway")
            say("warning: " + msg + " (PPO may learn to exploit it; --strict refuses)")
        gate = {"rm_eval_accuracy": rm_acc, "rm_length_corr": corr, "rm_length_corr_all": corr_all}
    else:
        gate = {}

    # -- 0g. state: KL controller, reward normalisation, watchdog; resume -------------------------
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else rl.FixedKLController(cfg.kl_coef))
    dog = Watchdog(negative_kl=cfg.watch_negative_kl, length_drift=cfg.watch_length_drift, distinct=cfg.watch_distinct,
                   eos_rate=cfg.watch_eos_rate, entropy=cfg.watch_entropy, hack_gold_drop=cfg.watch_hack_gold_drop)
    norm: dict | None = None  # {"mean", "std"} of the first rollout's scores, then fixed
    if ck is not None:
        state = training.load_checkpoint(acc, ck)
        start, norm, initial = state["step"], state["norm"], state["initial"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        dog.load_state_dict(state["watchdog"])
        gate = state.get("gate", {})
        say(f"resumed from {ck} at iteration {start}")
    else:
        start = 0
        initial = evaluate()
        dog.observe_eval(0, initial["eval_score"], initial.get("eval_gold_accuracy"))
    log = training.MetricLog(out / "log.jsonl", acc, truncate_after_step=start if ck is not None else None)
    if ck is None:
        log.log(0, **initial)
    gold_txt = lambda m: f" | gold {100 * m['eval_gold_accuracy']:.1f}%" if "eval_gold_accuracy" in m else ""  # noqa: E731
    say(f"iteration {start}: held-out score {initial['eval_score']:.3f}{gold_txt(initial)} | KL {initial['eval_kl']:.3f}"
        + (" (initial)" if ck is None else ""))
    if acc.is_main_process and cfg.report_to != "none":
        acc.init_trackers("ppo", config={k: v for k, v in to_dict(cfg).items() if isinstance(v, (int, float, str, bool))})

    def checkpoint(step: int) -> Path:
        st = {"norm": norm, "initial": initial, "kl_ctl": kl_ctl.state_dict(), "watchdog": dog.state_dict(), "gate": gate}
        return training.save_checkpoint(acc, out, step, st, cfg.keep_checkpoints)

    total = cfg.total_steps
    last_eval = initial
    t_start = time.perf_counter()
    step = start
    with training.GracefulStop() as stop:
        while step < total:
            t0 = time.perf_counter()
            idx = batch_indices(step, G, len(train_prompts), cfg.seed)[rank * B : (rank + 1) * B]
            prompts = [train_prompts[i] for i in idx]
            raw = [raw_train[i] for i in idx]

            # -- 1. generate the trajectory ------------------------------------------------------
            with torch.no_grad():
                samples = generate(prompts)  # batched, KV cache; cut at EOS
                t_gen = time.perf_counter() - t0
                r = partial_rollout(raw, prompts, samples)
                logits = roles.logits(r)
                r.logprobs = rl.logprobs_from_logits(logits, r.response_ids, temp)
                entropy = rl.masked_mean(rl.entropy_from_logits(logits, temp), r.response_mask)
                del logits
                r.ref_logprobs = rl.logprobs_from_logits(roles.ref_logits(r), r.response_ids, temp)
                r.values = roles.values(r) * r.response_mask

                # -- 2. score ---------------------------------------------------------------------
                r.scores = rm_scores(raw, prompts, samples, r)
                all_scores = acc.gather(r.scores)
                if norm is None:  # the first rollout fixes the normalisation for the whole run
                    sd = all_scores.std().item() if all_scores.numel() > 1 else 1.0
                    norm = {"mean": all_scores.mean().item(), "std": sd if sd > 1e-6 else 1.0} if cfg.normalize_reward \
                        else {"mean": 0.0, "std": 1.0}
                score = (r.scores - norm["mean"]) / norm["std"]
                score = score - cfg.missing_eos_penalty * (~r.ended).float()

                # -- 3. KL-shaped rewards -----------------------------------------------------------
                beta = kl_ctl.value
                r.rewards, r.kl = rl.kl_shaped_rewards(score, r.logprobs, r.ref_logprobs, r.response_mask, beta,
                                                       cfg.kl_estimator)

                # -- 4. GAE advantages and returns ----------------------------------------------------
                r.advantages, r.returns = rl.gae(r.rewards, r.values, r.response_mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    r.advantages = rl.masked_whiten(r.advantages, r.response_mask)
                ev = rl.explained_variance(r.values, r.returns, r.response_mask)
            t_roll = time.perf_counter() - t0

            # -- 5. PPO epochs over minibatches ------------------------------------------------------
            t1 = time.perf_counter()
            stats = {k: torch.zeros((), device=acc.device) for k in
                     ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "grad_norm", "critic_grad_norm")}
            n_updates, stopped_early = 0, False
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, device=acc.device)
                for m0 in range(0, B, MB):
                    mb = r.select(perm[m0 : m0 + MB])
                    n_tok = mb.response_mask.sum().clamp(min=1)
                    mb_stats = {k: torch.zeros((), device=acc.device) for k in stats}
                    chunks = list(range(0, MB, micro))
                    for j, c0 in enumerate(chunks):
                        u = mb.select(torch.arange(c0, min(c0 + micro, MB), device=acc.device))
                        w = u.response_mask.sum() / n_tok  # token share: the minibatch loss is a token mean
                        sync = j == len(chunks) - 1
                        with contextlib.ExitStack() as no_sync:  # all-reduce gradients on the last micro-batch only
                            if not sync:
                                for m in roles.trained:
                                    no_sync.enter_context(acc.no_sync(m))
                            logits, v = roles.train_forward(u)  # (b, T, V), (b, T)
                            logp = rl.logprobs_from_logits(logits, u.response_ids, temp)
                            pg, st = rl.policy_loss(logp, u.logprobs, u.advantages, u.response_mask, cfg.clip_range)
                            loss = pg
                            if cfg.entropy_coef > 0:
                                ent = rl.masked_mean(rl.entropy_from_logits(logits, temp), u.response_mask)
                                loss = loss - cfg.entropy_coef * ent
                            vl, vst = rl.value_loss(v, u.values, u.returns, u.response_mask, cfg.value_clip)
                            acc.backward((loss + vl) * w)  # separate parameters, separate optimizers: one backward
                        for k, x in (("policy_loss", pg), ("value_loss", vl), ("clipfrac", st["clipfrac"]),
                                     ("approx_kl", st["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
                            mb_stats[k] += x.detach() * w
                    # Early stop on approximate KL, agreed by all processes (the step is skipped, as in SB3's PPO).
                    if cfg.target_kl > 0 and acc.reduce(mb_stats["approx_kl"].clone(), reduction="mean").item() > cfg.target_kl:
                        opt_actor.zero_grad(set_to_none=True)
                        opt_critic.zero_grad(set_to_none=True)
                        stopped_early = True
                        break
                    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                    mb_stats["grad_norm"] = torch.as_tensor(acc.clip_grad_norm_(roles.actor_params(), clip), dtype=torch.float32).detach()
                    mb_stats["critic_grad_norm"] = torch.as_tensor(acc.clip_grad_norm_(roles.critic_params(), clip), dtype=torch.float32).detach()
                    opt_actor.step()
                    opt_critic.step()
                    opt_actor.zero_grad(set_to_none=True)
                    opt_critic.zero_grad(set_to_none=True)
                    for k in stats:
                        stats[k] += mb_stats[k]
                    n_updates += 1
                if stopped_early:
                    break
            t_upd = time.perf_counter() - t1
            step += 1

            # -- 6. metrics, watchdog, evaluation, checkpoint ----------------------------------------
            seq_kl = r.kl.sum(1)  # (B,) per-sequence KL estimate to the reference
            local = torch.stack([
                seq_kl.mean(), entropy, r.response_mask.sum(1).mean(), r.ended.float().mean(), ev,
                (r.rewards.sum(1)).mean(), torch.tensor(rl.distinct_n([s.token_ids for s in samples], 2), device=acc.device),
                *(stats[k] / max(n_updates, 1) for k in stats),
            ]).float()
            g = acc.reduce(local, reduction="mean").tolist()
            m = dict(zip(["kl", "entropy", "response_length", "eos_rate", "explained_variance", "reward",
                          "distinct_2", *stats.keys()], g))
            m.update(score_mean=all_scores.mean().item(), score_std=all_scores.std().item() if all_scores.numel() > 1 else 0.0,
                     beta=beta, updates=n_updates, epochs_stopped_early=int(stopped_early),
                     rollout_seconds=t_roll, update_seconds=t_upd, generate_seconds=t_gen,
                     rollout_tokens_per_second=acc.reduce(r.response_mask.sum(), reduction="sum").item() / max(t_gen, 1e-9),
                     episodes=step * G)
            if not cfg.prompts:  # built-in world: gold accuracy of the sampled training responses
                from lifecycle.data import world

                gold = sum(world.gold_check(p, s.text, s.ended) for p, s in zip(prompts, samples)) / max(len(samples), 1)
                m["gold_train"] = acc.reduce(torch.tensor(gold, device=acc.device), reduction="mean").item()
            kl_ctl.update(m["kl"], G)
            alarms = dog.observe_step(step, m)
            if step % cfg.eval_every == 0 or step == total:
                last_eval = evaluate()
                m.update(last_eval)
                alarms += dog.observe_eval(step, last_eval["eval_score"], last_eval.get("eval_gold_accuracy"))
            if dog.active:
                m["alarms"] = sorted(dog.active)
            log.log(step, **m)
            elapsed = time.perf_counter() - t_start
            if step % cfg.log_every == 0 or step == total or step == start + 1:
                eta = elapsed / (step - start) * (total - step)
                say(f"iter {step}/{total} | score {m['score_mean']:.2f}±{m['score_std']:.2f} | KL {m['kl']:.3f} | "
                    f"ent {m['entropy']:.3f} | clip {m['clipfrac']:.3f} | akl {m['approx_kl']:.4f} | "
                    f"vloss {m['value_loss']:.3f} | EV {m['explained_variance']:.2f} | len {m['response_length']:.2f} | "
                    f"eos {100 * m['eos_rate']:.0f}%" + (f" | gold(sampled) {100 * m['gold_train']:.0f}%" if "gold_train" in m else "")
                    + f" | {t_roll + t_upd:.2f}s/it | ETA {training.format_eta(eta)}")
            if "eval_score" in m:
                say(f"iter {step}: held-out score {m['eval_score']:.3f}{gold_txt(m)} | KL {m['eval_kl']:.3f} nats/response")
            for a in alarms:
                say(f"WATCHDOG [{a['alarm']}] at iteration {a['step']}: {a['message']}")
            if cfg.debug_digest:
                _write_digest(out, rank, step, *roles.digest_models())

            stop_req = acc.reduce(torch.tensor(1.0 if stop.requested else 0.0, device=acc.device), reduction="sum").item() > 0
            if stop_req:
                path = checkpoint(step)
                raise Interrupted(f"{stop.requested or 'signal'} at iteration {step}: checkpoint saved to {path}; "
                                  "continue with --resume")
            if alarms and cfg.stop_on_collapse:
                path = checkpoint(step)
                raise Interrupted(f"watchdog ({', '.join(a['alarm'] for a in alarms)}) at iteration {step}: checkpoint "
                                  f"saved to {path}; inspect OUT/log.jsonl, then --resume or change the recipe")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                checkpoint(step)

    # -- 7. final evaluation and the artifact ----------------------------------------------------
    final = last_eval if step == total and start < total else evaluate()
    checkpoint(total)  # `--resume` on a finished run is then a no-op, not an error
    metrics = {
        "score_initial": initial["eval_score"], "score": final["eval_score"],
        "kl": final["eval_kl"],
        "response_length": final["eval_length"], "eos_rate": final["eval_eos_rate"],
        "iterations": total, "episodes": total * G, "train_seconds": time.perf_counter() - t_start,
        "beta_final": kl_ctl.value, "reward_norm": norm, "reward_hacking": dog.hacking,
        "watchdog_alarms": [e["alarm"] for e in dog.events], **gate,
    }
    if "eval_gold_accuracy" in initial:
        metrics["gold_accuracy_initial"] = initial["eval_gold_accuracy"]
        metrics["gold_accuracy"] = final["eval_gold_accuracy"]
        for k in ("carry", "nocarry"):
            metrics[f"gold_accuracy_{k}_initial"] = initial.get(f"eval_gold_accuracy_{k}")
            metrics[f"gold_accuracy_{k}"] = final.get(f"eval_gold_accuracy_{k}")
    metrics["wall_seconds"] = time.perf_counter() - t_wall
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_artifact(cfg, inputs, roles, metrics, dog, out)
        g = (f" | gold accuracy {100 * metrics['gold_accuracy_initial']:.1f}% -> {100 * metrics['gold_accuracy']:.1f}%"
             if "gold_accuracy" in metrics else "")
        say(f"held-out score {metrics['score_initial']:.3f} -> {metrics['score']:.3f}{g} | KL {metrics['kl']:.3f} nats "
            f"| {metrics['train_seconds']:.0f}s | wrote {out}")
        if dog.events:
            say(f"watchdog raised: {', '.join(sorted(set(metrics['watchdog_alarms'])))} (see OUT/log.jsonl and lifecycle.json)")
    acc.wait_for_everyone()
    acc.end_training()
    return out


# ---------------------------------------------------------------------------
# Small pieces used by run()
# ---------------------------------------------------------------------------
def _quiet() -> None:
    """Library chatter off (load bars, advisory warnings, accelerate's note on tied weights); our lines stay."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def weights_digest(model) -> str:
    """sha256 over a model's parameters (names and values), to compare processes."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_digest(out: Path, rank: int, step: int, actor, critic) -> None:
    d = out / "digests"
    d.mkdir(parents=True, exist_ok=True)
    from lifecycle.artifacts import atomic_write_json

    atomic_write_json(d / f"rank-{rank}.json", {"step": step, "actor": weights_digest(actor), "critic": weights_digest(critic)})


def _write_artifact(cfg: PPOConfig, inputs: dict, roles: Roles, metrics: dict, dog, out: Path) -> None:
    """OUT: the actor as a plain causal LM (merged when LoRA), OUT/critic: the critic as a sequence classifier."""
    import tempfile

    from lifecycle import artifacts

    tok = roles.tok
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        actor, critic, extra_dirs = roles.final_models(cfg, inputs["policy"].path, Path(tmp))

        def write_critic(d: Path) -> None:
            critic.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)

        extra_dirs["critic"] = write_critic
        actor.generation_config.eos_token_id = tok.eos_token_id
        actor.generation_config.pad_token_id = tok.pad_token_id
        artifacts.save_model_artifact(
            actor, tok, out, stage="ppo", config=to_dict(cfg), metrics=metrics,
            parent=artifacts.parent_record(inputs["policy"]), seed=cfg.seed, extra_dirs=extra_dirs,
            extra={"reward": artifacts.parent_record(inputs["reward"]), "critic_init": roles.critic_source,
                   "shared_base": isinstance(roles, SharedRoles), "watchdog": dog.events},
        )
