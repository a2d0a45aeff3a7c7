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

Distribution: Accelerate wraps actor and critic in DDP, so gradients are
all-reduced; every process generates its own rollouts from its own slice of
each global prompt batch, with its own sampling seed. Scalars that decide
control flow (normalisation stats, KL for the controller, early stop, stop
requests) are reduced across processes so that all of them take the same path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    if not info["hub"]:
        n = _num_labels(info["path"])
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


def response_values(critic, r: Rollout):
    """V(s_t) for each response position: (B, T), read at positions P-1 .. P+T-2."""
    ids, mask, pos = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    return critic(ids, mask, pos)[:, P - 1 : P + T - 1]


# ---------------------------------------------------------------------------
# 0d. Loading the four roles
# ---------------------------------------------------------------------------
def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id


def load_roles(cfg: PPOConfig, inputs: dict, say) -> dict:
    """actor, ref (None with adapters: the actor with its adapter disabled), reward, critic, tokenizers."""
    import torch

    from lifecycle.modeling import REWARD_HEAD, load_causal_lm, load_for_training
    from lifecycle.reward_model import load_reward_model
    from lifecycle.tokenizer import load_tokenizer

    policy_path, reward_path = inputs["policy"]["path"], inputs["reward"]["path"]
    tok = load_tokenizer(policy_path)
    reward_tok = load_tokenizer(reward_path)
    same_tok = _same_tokenizer(tok, reward_tok)
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
    source = {"reward": reward_path, "policy": policy_path}.get(cfg.critic, (inputs["critic"] or {}).get("path"))
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
    return {"actor": actor, "ref": ref, "reward": reward, "critic": critic, "tok": tok, "reward_tok": reward_tok,
            "same_tok": same_tok, "critic_source": source}


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

    tok = load_tokenizer(inputs["policy"]["path"])
    texts = render_prompts(tok, inputs["train"][:sample] + inputs["eval"][:sample])
    return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def memory_estimate(cfg: PPOConfig, inputs: dict, processes: int, micro: int, seq: int, check: bool = False):
    """lifecycle.memory's estimate for stage "ppo" (an Estimate), or parameter-count figures (a str) when the
    estimator cannot model this architecture. With check=True it refuses a run that does not fit (unless --force)."""
    from transformers import AutoConfig

    dtype = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.mixed_precision, "fp32")
    method = "qlora" if cfg.qlora else ("lora" if cfg.lora else "full")
    conf = AutoConfig.from_pretrained(inputs["policy"]["path"]).to_dict()
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
    n_pol, pconf = _param_count(inputs["policy"]["path"], "causal")
    n_rm, _ = _param_count(inputs["reward"]["path"], "reward")
    crit_path = {"reward": inputs["reward"]["path"], "policy": inputs["policy"]["path"]}.get(cfg.critic, (inputs["critic"] or {}).get("path"))
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

    out = Path(cfg.out)
    ck = training.require_checkpoint(out) if cfg.resume else None
    inputs = check_inputs(cfg)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lifecycle import artifacts, rl
    from lifecycle.generate import generate_batch, render_prompts
    from lifecycle.modeling import describe_trainable
    from lifecycle.reward_model import score as score_texts
    from lifecycle.reward_model import score_tokens
    from lifecycle.watchdog import Watchdog

    _quiet()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=None if cfg.report_to == "none" else cfg.report_to,
                      project_dir=str(out))
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
    actor, ref, reward, critic = roles["actor"], roles["ref"], roles["reward"], roles["critic"]
    tok, reward_tok = roles["tok"], roles["reward_tok"]
    actor.eval()  # no dropout anywhere: the ratio π/π_old must be 1 before the first update
    critic.eval()
    say(f"actor: {describe_trainable(actor)} | critic from {roles['critic_source']}: {describe_trainable(critic)}")
    say(f"each iteration: {G} prompts ({B} per process x {W}) -> {cfg.ppo_epochs} epochs x {G // cfg.minibatch_size} "
        f"minibatches of {cfg.minibatch_size} ({-(-MB // micro)} micro-batch(es) of {micro} per process); --explain shows memory")

    opt_actor = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    opt_critic = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=cfg.critic_lr,
                                   weight_decay=cfg.weight_decay)
    actor, critic, opt_actor, opt_critic = acc.prepare(actor, critic, opt_actor, opt_critic)
    if ref is not None:
        ref.to(acc.device)
    reward.to(acc.device)
    actor_u = acc.unwrap_model(actor)  # for generation and no-grad passes
    critic_u = acc.unwrap_model(critic)
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses

    eos, pad = tok.eos_token_id, tok.pad_token_id
    train_prompts = render_prompts(tok, inputs["train"])
    eval_prompts = render_prompts(tok, inputs["eval"])
    raw_train, raw_eval = inputs["train"], inputs["eval"]
    problems = inputs["problems"]
    temp = cfg.temperature

    # -- helpers that close over the roles ----------------------------------------------------
    def generate(prompts: list[str], greedy: bool = False) -> list:
        return generate_batch(actor_u, tok, prompts, max_new_tokens=cfg.max_new_tokens,
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

    def ref_logits(r: Rollout):
        if ref is not None:
            return response_logits(ref, r)
        with actor_u.disable_adapter():  # the reference is the base under the actor's adapter
            return response_logits(actor_u, r)

    def rm_scores(raw_prompts: list, prompts: list[str], samples: list, r: Rollout):
        """The reward model's score of each prompt+response, (B,)."""
        if score_fn is not None:
            return torch.tensor(score_fn(prompts, samples), dtype=torch.float32, device=acc.device)
        if roles["same_tok"]:
            ids, mask, _ = model_inputs(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
            return score_tokens(reward, ids, mask)
        # Different tokenizers: hand over through text, re-rendered with the reward model's own template.
        return torch.tensor(score_texts(reward, reward_tok, raw_prompts, [s.text for s in samples]),
                            dtype=torch.float32, device=acc.device)

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
        sums = torch.zeros(6, device=acc.device)  # score, gold, n, kl, length, ended
        if prompts:
            greedy = generate(prompts, greedy=True)
            r = partial_rollout(raw, prompts, greedy)
            sums[0] = rm_scores(raw, prompts, greedy, r).sum()
            if problems is not None:
                from lifecycle.data import world

                sums[1] = sum(world.gold_check(problems[i].question, s.text, s.ended) for i, s in zip(idx, greedy))
            sums[2] = len(prompts)
            sums[4] = r.response_mask.sum()
            sums[5] = r.ended.float().sum()
            sampled = generate(prompts)
            r = partial_rollout(raw, prompts, sampled)
            lp = torch.log_softmax(response_logits(actor_u, r).float() / temp, -1)
            lq = torch.log_softmax(ref_logits(r).float() / temp, -1)
            kl_tok = (lp.exp() * (lp - lq)).sum(-1)  # (B, T) exact KL(π(·|s_t) || π_ref(·|s_t))
            sums[3] = (kl_tok * r.response_mask).sum()
        sums = acc.reduce(sums, reduction="sum")
        n = sums[2].clamp(min=1)
        res = {"eval_score": (sums[0] / n).item(), "eval_kl": (sums[3] / n).item(),
               "eval_length": (sums[4] / n).item(), "eval_eos_rate": (sums[5] / n).item()}
        if problems is not None:
            res["eval_gold_accuracy"] = (sums[1] / n).item()
        return res

    # -- 0f. the reward-model quality gate ----------------------------------------------------
    if ck is None and score_fn is None:
        rm_manifest = inputs["reward"].get("manifest") or {}
        rm_acc = (rm_manifest.get("metrics") or {}).get("eval_accuracy")
        n_gate = max(1, cfg.gate_samples // W)
        gate_idx = batch_indices(0, n_gate * W, len(train_prompts), cfg.seed + 1)[rank * n_gate : (rank + 1) * n_gate]
        gp = [train_prompts[i] for i in gate_idx]
        with torch.no_grad():
            gs = generate(gp)
            gr = partial_rollout([raw_train[i] for i in gate_idx], gp, gs)
            sc = rm_scores([raw_train[i] for i in gate_idx], gp, gs, gr)
        both = acc.gather(torch.stack([sc, gr.response_mask.sum(1)], 1)).cpu()
        corr = rl.pearson(both[:, 0].tolist(), both[:, 1].tolist())
        problems_found = []
        if rm_acc is None:
            say("reward-model gate: its manifest records no eval_accuracy; its quality is unknown")
        elif rm_acc < cfg.gate_min_accuracy:
            problems_found.append(f"held-out pairwise accuracy {rm_acc:.3f} < {cfg.gate_min_accuracy}")
        if abs(corr) > cfg.gate_max_length_corr:
            problems_found.append(f"its score correlates with response length (r = {corr:+.2f}, limit ±{cfg.gate_max_length_corr})")
        acc_txt = f"{rm_acc:.3f}" if rm_acc is not None else "unknown"
        say(f"reward-model gate: pairwise accuracy {acc_txt}, score-length correlation {corr:+.2f} on {len(both)} samples")
        if problems_found:
            msg = "reward-model quality gate: " + "; ".join(problems_found)
            if cfg.strict:
                raise UsageError(msg + "; train a better reward model, or drop --strict to go on anyway")
            say("warning: " + msg + " (PPO may learn to exploit it; --strict refuses)")
        gate = {"rm_eval_accuracy": rm_acc, "rm_length_corr": corr}
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
                logits = response_logits(actor_u, r)
                r.logprobs = rl.logprobs_from_logits(logits, r.response_ids, temp)
                entropy = rl.masked_mean(rl.entropy_from_logits(logits, temp), r.response_mask)
                del logits
                r.ref_logprobs = rl.logprobs_from_logits(ref_logits(r), r.response_ids, temp)
                r.values = response_values(critic_u, r) * r.response_mask

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
                        with acc.no_sync(actor) if not sync else _null(), acc.no_sync(critic) if not sync else _null():
                            logits = response_logits(actor, u)
                            logp = rl.logprobs_from_logits(logits, u.response_ids, temp)
                            pg, st = rl.policy_loss(logp, u.logprobs, u.advantages, u.response_mask, cfg.clip_range)
                            loss = pg
                            if cfg.entropy_coef > 0:
                                ent = rl.masked_mean(rl.entropy_from_logits(logits, temp), u.response_mask)
                                loss = loss - cfg.entropy_coef * ent
                            acc.backward(loss * w)
                            v = response_values(critic, u)
                            vl, vst = rl.value_loss(v, u.values, u.returns, u.response_mask, cfg.value_clip)
                            acc.backward(vl * w)
                        for k, x in (("policy_loss", pg), ("value_loss", vl), ("clipfrac", st["clipfrac"]),
                                     ("approx_kl", st["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
                            mb_stats[k] += x.detach() * w
                    # Early stop on approximate KL, agreed by all processes (the step is skipped, as in SB3's PPO).
                    akl = acc.reduce(mb_stats["approx_kl"].clone(), reduction="mean")
                    if cfg.target_kl > 0 and akl.item() > cfg.target_kl:
                        opt_actor.zero_grad(set_to_none=True)
                        opt_critic.zero_grad(set_to_none=True)
                        stopped_early = True
                        break
                    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                    mb_stats["grad_norm"] = torch.as_tensor(acc.clip_grad_norm_(actor.parameters(), clip), dtype=torch.float32).detach()
                    mb_stats["critic_grad_norm"] = torch.as_tensor(acc.clip_grad_norm_(critic.parameters(), clip), dtype=torch.float32).detach()
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
                _write_digest(out, rank, step, actor_u, critic_u)

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
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_artifact(cfg, inputs, roles, actor_u, critic_u, tok, metrics, dog, out)
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
class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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


def _write_artifact(cfg: PPOConfig, inputs: dict, roles: dict, actor, critic, tok, metrics: dict, dog, out: Path) -> None:
    """OUT: the actor as a plain causal LM (merged when LoRA), OUT/critic: the critic as a sequence classifier."""
    import tempfile

    from lifecycle import artifacts
    from lifecycle.modeling import REWARD_HEAD, merge_adapter

    policy_path = inputs["policy"]["path"]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        extra_dirs = {}
        if cfg.use_peft:
            actor.save_pretrained(Path(tmp) / "actor_adapter")
            model = merge_adapter(policy_path, str(Path(tmp) / "actor_adapter"))
            extra_dirs["adapter"] = lambda d: actor.save_pretrained(d)
        else:
            model = actor
        seqcls = critic.model
        if hasattr(seqcls, "peft_config"):
            seqcls.save_pretrained(Path(tmp) / "critic_adapter")
            seqcls = merge_adapter(roles["critic_source"], str(Path(tmp) / "critic_adapter"), head=REWARD_HEAD,
                                   pad_token_id=tok.pad_token_id)

        def write_critic(d: Path) -> None:
            seqcls.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)

        extra_dirs["critic"] = write_critic
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        artifacts.save_model_artifact(
            model, tok, out, stage="ppo", config=to_dict(cfg), metrics=metrics,
            parent=artifacts.parent_record(inputs["policy"]), seed=cfg.seed, extra_dirs=extra_dirs,
            extra={"reward": artifacts.parent_record(inputs["reward"]), "critic_init": roles["critic_source"],
                   "watchdog": dog.events},
        )
