"""The four PPO roles behind one interface, loaded separately or on one shared base.

  actor      π      initialised from the SFT policy; trained
  reference  π_ref  the SFT policy, frozen (with --lora/--qlora: the actor with its adapter disabled)
  reward     r_φ    the reward model, frozen: one score per (prompt, response)
  critic     V      a per-token value head, initialised from the reward model; trained

(Ouyang et al. 2022, InstructGPT sec. 3.5; Ziegler et al. 2019.) The PPO loop
in lifecycle/stages/ppo.py only calls the methods of `Roles`; `SharedRoles`
implements them on one base model carrying three adapters, for --lora/--qlora
when the reward model is itself a LoRA adapter over the policy's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model
from safetensors.torch import load_file

from lifecycle.artifacts import REWARD_MODEL, Artifact, artifact_digest, atomic_write_json, check_artifact
from lifecycle.config import PPOConfig
from lifecycle.data.chat import end_of_turn_ids
from lifecycle.errors import UsageError
from lifecycle.modeling import (REWARD_HEAD, count_params, describe_trainable, load_causal_lm, load_for_training,
                                lora_config, merge_adapter)
from lifecycle.generate import Sample, generate_batch, render_prompts
from lifecycle.reward_model import encode, load_reward_model, pad_batch, score_tokens
from lifecycle.rl import Rollout
from lifecycle.tokenizer import load_tokenizer


def response_logits(model, r: Rollout) -> torch.Tensor:
    """Logits that predict each response token: (B, T, V), from positions P-1 .. P+T-2."""
    ids, mask, pos = r.model_inputs()
    T = r.response_ids.shape[1]
    # Only the last T+1 positions go through the output layer (the prompt's own predictions are never used).
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
    return keep_last(out.logits, T + 1, ids.shape[1])[:, :-1]


def keep_last(logits: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """The last k positions of (B, L', V) logits asked for with logits_to_keep=k. A model that ignores
    logits_to_keep returns all `length` positions: those are cut here, so no later gather reads the wrong ones.
    Any other length is a model that answered something else, and stops the run."""
    n = logits.shape[1]
    if n == length and n != k:
        logits = logits[:, -k:]
    if logits.shape[1] != k:
        raise RuntimeError(f"the model returned logits for {n} positions; asked for the last {k} of {length}")
    return logits


def _body(model):
    """The transformer body (no output layer) of a transformers model, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class ValueModel(torch.nn.Module):
    """V(s_t) = head(h_t): a one-label sequence classifier whose head is applied to every position.

    Initialised from the reward model, the critic starts out predicting the
    reward model's score at the end of the response (InstructGPT sec. 3.5);
    saved, it is a plain AutoModelForSequenceClassification directory.
    """

    def __init__(self, seqcls):
        super().__init__()
        self.model = seqcls  # may be a peft model
        self.shift, self.scale = 0.0, 1.0  # V = (head(h) - shift) / scale: see Roles.set_value_scale

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        h = _body(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, L, H)
        v = base.score(h.to(base.score.weight.dtype)).squeeze(-1).float()  # (B, L)
        return (v - self.shift) / self.scale


class Roles:
    """Actor, reference, reward model and critic as separate models (the reference is the actor with its
    adapter disabled under --lora/--qlora)."""

    def __init__(self, actor, ref, reward, critic, *, tok, reward_tok, same_tok: bool, critic_source: str):
        self.actor, self.ref, self.reward, self.critic = actor, ref, reward, critic
        self.actor_u, self.critic_u = actor, critic  # unwrapped (no DDP): for no-grad passes
        self.tok, self.reward_tok, self.same_tok, self.critic_source = tok, reward_tok, same_tok, critic_source
        self.trained = [actor, critic]  # the modules Accelerate wraps (DDP)
        self.reads_rollout_ids = False  # see `check_reading`
        self.autocast = contextlib.nullcontext  # the accelerator's autocast after `prepare`: every pass of every role

    # -- setup -----------------------------------------------------------------
    def actor_params(self) -> list:
        return [p for p in self.actor.parameters() if p.requires_grad]

    def critic_params(self) -> list:
        return [p for p in self.critic.parameters() if p.requires_grad]

    def prepare(self, acc, opt):
        """Wrap the trained modules (DDP across processes), move the frozen ones; returns the optimizer.

        Every forward pass of every role, with or without gradients, then runs under the accelerator's autocast
        (`self.autocast`), so one role computes at one precision: under bf16 the reference equals the actor and
        the rollout's log-probs equal the first update's (KL 0, ratio 1 at the start), as in fp32."""
        self.actor, self.critic, opt = acc.prepare(self.actor, self.critic, opt)
        self.trained = [self.actor, self.critic]
        for m in (self.ref, self.reward):
            if m is not None:
                m.to(acc.device)
        self.actor_u, self.critic_u = acc.unwrap_model(self.actor), acc.unwrap_model(self.critic)
        self.autocast = acc.autocast
        return opt

    def trained_models(self) -> list:
        """The unwrapped models whose weights train (for gradient checkpointing and dropout)."""
        return [self.actor_u, self.critic_u.model]

    def enable_gradient_checkpointing(self) -> str:
        """Recompute activations in backward for actor and critic. Transformers checkpoints only in training mode,
        so the trained models go to train mode with every dropout probability set to 0 (as TRL does): the passes
        stay deterministic and the first ratio stays 1. Generation switches to eval mode on its own."""
        for m in self.trained_models():
            base = m.get_base_model() if hasattr(m, "get_base_model") else m
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5's name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()  # frozen embeddings (LoRA): checkpointed blocks still get a grad path
            disable_dropout(m)
            m.train()
        return "gradient checkpointing: on for actor and critic (train mode, dropout off)"

    def describe(self) -> str:
        return f"actor: {describe_trainable(self.actor)} | critic from {self.critic_source}: {describe_trainable(self.critic)}"

    def set_value_scale(self, mean: float, std: float) -> None:
        """Put the critic's output on the normalised reward scale: V = (head(h) - mean) / std, the map the scores
        go through, so a critic that starts as the reward model predicts the normalised score (as OpenRLHF's
        critic applies the reward normalisation). The saved critic keeps the raw head (the manifest's reward_norm)."""
        self.critic_u.shift, self.critic_u.scale = float(mean), float(std)

    # -- sampling --------------------------------------------------------------------
    def sample(self, prompts: list[str], cfg: PPOConfig, stop: list[int], greedy: bool = False,
               batch_size: int = 0) -> list[Sample]:
        """One response per rendered prompt from the actor: softmax(logits / T), cut at the first stop id;
        `batch_size` prompts at a time (0: all at once)."""
        with self.autocast():
            return generate_batch(self.generation_model(), self.tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                  temperature=0.0 if greedy else cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  batch_size=batch_size or max(len(prompts), 1), stop=stop)

    def to_rollout(self, prompts: list[str], samples: list[Sample], device) -> Rollout:
        """Prompt (left-padded) and response (right-padded) tensors of a list of samples; the rest zeros."""
        tok = self.tok
        old = tok.padding_side
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = old
        T = max(len(s.token_ids) for s in samples)
        resp = torch.full((len(samples), T), tok.pad_token_id, dtype=torch.long)  # (B, T)
        rmask = torch.zeros((len(samples), T))  # (B, T)
        for i, s in enumerate(samples):
            resp[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
            rmask[i, : len(s.token_ids)] = 1
        ended = torch.tensor([s.ended for s in samples])  # (B,)
        return Rollout.sampled(enc["input_ids"].to(device), enc["attention_mask"].to(device), resp.to(device),
                               rmask.to(device), ended.to(device))

    # -- forward passes ------------------------------------------------------------
    def generation_model(self):
        return self.actor_u

    def logits(self, r: Rollout) -> torch.Tensor:
        """Actor logits at the response positions, (B, T, V); no DDP wrapper (no-grad passes)."""
        with self.autocast():
            return response_logits(self.actor_u, r)

    def ref_logits(self, r: Rollout) -> torch.Tensor:
        with self.autocast():
            if self.ref is not None:
                return response_logits(self.ref, r)
            with self.actor_u.disable_adapter():  # the reference is the base under the actor's adapter
                return response_logits(self.actor_u, r)

    def values(self, r: Rollout) -> torch.Tensor:
        """(B, T) V(s_t) at the response positions."""
        with self.autocast():
            return r.at_responses(self.critic_u(*r.model_inputs()))

    def train_forward(self, u: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T)) through the wrapped modules, for one backward of both losses."""
        with self.autocast():
            return response_logits(self.actor, u), u.at_responses(self.critic(*u.model_inputs()))

    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reward-model scores (B,) of token ids in the reward model's vocabulary, read at each row's last real token."""
        with self.autocast():
            return score_tokens(self.reward, ids, mask)

    # -- the reward model reads what `llm reward` trained it on --------------------------------
    def check_reading(self, prompt, stop: list[int]) -> bool:
        """Whether a rollout's ids (rendered prompt + sampled response up to its stop id) are the ids `llm reward`
        trains on (reward_model.encode: the reward tokenizer's chat template, the turn closed by its end marker).
        Checked once on a probe answer: same tokenizer, the rendered prompt is a prefix of the rendered
        conversation, and the conversation ends with a stop id the policy emits. Sets `reads_rollout_ids`."""
        self.reads_rollout_ids = False
        if self.same_tok:
            [full], _ = encode(self.reward_tok, [prompt], ["0"])
            head = self.tok(render_prompts(self.tok, [prompt])[0], add_special_tokens=False)["input_ids"]
            self.reads_rollout_ids = full[: len(head)] == head and full[-1] in stop
        return self.reads_rollout_ids

    def score_samples(self, raw_prompts: list, samples: list, r: Rollout) -> torch.Tensor:
        """(B,) the reward model's score of each prompt + response, read where `llm reward` reads it: at the end of
        the conversation rendered by the reward tokenizer's chat template. The rollout's own ids when they are that
        rendering (`check_reading`); otherwise the response text goes over and is rendered with the reward's template."""
        if self.reads_rollout_ids:  # a response cut at max_new_tokens has no stop id: the reward model sees it open
            ids, mask, _ = r.model_inputs()
            return self.scores(ids, mask)
        seqs, _ = encode(self.reward_tok, raw_prompts, [s.text for s in samples])
        # encode closes every turn with its end marker; a response that never ended must not look finished: the
        # marker goes, and the score is read at the response's last token, as with the rollout's own ids.
        seqs = [open_turn(q, self.reward_tok) if not s.ended else q for q, s in zip(seqs, samples)]
        ids, mask = pad_batch(seqs, self.reward_tok.pad_token_id, "right")
        return self.scores(ids.to(r.response_ids.device), mask.to(r.response_ids.device))

    # -- output -----------------------------------------------------------------------
    def digest_models(self) -> tuple:
        return self.actor_u, self.critic_u

    def final_models(self, cfg: PPOConfig, policy_path: str, tmp: Path) -> tuple:
        """(actor as a plain causal LM, critic as a plain one-label classifier, extra artifact dirs)."""
        extra: dict[str, Callable[[Path], None]] = {}
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


def open_turn(ids: list[int], tok) -> list[int]:
    """A rendered conversation without the end-of-turn marker(s) that close its last turn."""
    ends = set(end_of_turn_ids(tok)) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    k = len(ids)
    while k > 1 and ids[k - 1] in ends:
        k -= 1
    return ids[:k]


def disable_dropout(model) -> None:
    """Every dropout probability of a model set to 0: its Dropout modules and its config's *dropout* fields
    (attention dropout is often applied functionally from the config)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        conf = getattr(m, "config", None)
        if conf is not None and hasattr(conf, "to_dict"):
            for k, v in conf.to_dict().items():
                if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float):
                    setattr(conf, k, 0.0)


class SharedBase(torch.nn.Module):
    """One (optionally 4-bit) base with the adapters "actor", "critic" (trained) and "reward" (frozen), the
    reward model's score head (frozen) and the critic's value head (trained). Its forward is the training
    forward: the actor's logits and the critic's values, so DDP wraps one module."""

    TRAINED = ("actor", "critic")

    def __init__(self, peft_model, reward_head: torch.nn.Linear, value_head: torch.nn.Linear):
        super().__init__()
        self.peft, self.reward_head, self.value_head = peft_model, reward_head, value_head
        self.value_shift, self.value_scale = 0.0, 1.0

    def use(self, name: str) -> None:
        """Make one adapter active without changing what trains (peft's set_adapter would freeze the others)."""
        self.peft.base_model.set_adapter(name)
        for n, p in self.peft.named_parameters():
            if ".lora_" in n:
                p.requires_grad_(any(f".{a}." in n or n.endswith(f".{a}") for a in self.TRAINED))

    def hidden(self, ids, mask, pos) -> torch.Tensor:
        """Last hidden states (B, L, H) of the base under the active adapter."""
        return _body(self.peft)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int):
        """(B, K, V) actor logits of the last K positions and (B, L) critic values."""
        self.use("actor")
        logits = self.peft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, logits_to_keep=logits_to_keep).logits
        self.use("critic")
        h = self.hidden(input_ids, attention_mask, position_ids)
        return logits, self.value(h)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L) values from hidden states, on the scale `SharedRoles.set_value_scale` chose."""
        return (self.value_head(h).squeeze(-1).float() - self.value_shift) / self.value_scale


class SharedRoles(Roles):
    """All four roles on one `SharedBase`: the reference is the base with every adapter disabled."""

    def __init__(self, module: SharedBase, *, tok, critic_source: str):
        self.module = module  # always the unwrapped module
        self.shared = module  # what the training forward calls: DDP-wrapped after prepare
        self.tok = self.reward_tok = tok
        self.same_tok, self.critic_source = True, critic_source
        self.ref = self.reward = None
        self.reads_rollout_ids = False
        self.trained = [self.shared]
        self.autocast = contextlib.nullcontext

    def use(self, name: str) -> None:
        self.module.use(name)

    def hidden(self, ids, mask, pos) -> torch.Tensor:
        return self.module.hidden(ids, mask, pos)

    # -- setup ------------------------------------------------------------------------
    def actor_params(self) -> list:
        return [p for n, p in self.module.peft.named_parameters() if ".lora_" in n and ".actor" in n]

    def critic_params(self) -> list:
        return [p for n, p in self.module.peft.named_parameters() if ".lora_" in n and ".critic" in n] + \
            list(self.module.value_head.parameters())

    def prepare(self, acc, opt):
        self.shared, opt = acc.prepare(self.module, opt)
        self.trained = [self.shared]
        self.autocast = acc.autocast
        return opt

    def trained_models(self) -> list:
        return [self.module.peft]

    def describe(self) -> str:
        _, total = count_params(self.module.peft.get_base_model())
        n_a, n_c = sum(p.numel() for p in self.actor_params()), sum(p.numel() for p in self.critic_params())
        return (f"one shared base ({total:,} parameters) for all four roles: adapters actor ({n_a:,} trainable), "
                f"critic ({n_c:,} trainable, from {self.critic_source}), reward (frozen); reference = adapters disabled")

    # -- forward passes -------------------------------------------------------------------
    def generation_model(self):
        self.use("actor")
        return self.module.peft

    def logits(self, r: Rollout) -> torch.Tensor:
        self.use("actor")
        with self.autocast():
            return response_logits(self.module.peft, r)

    def ref_logits(self, r: Rollout) -> torch.Tensor:
        with self.autocast(), self.module.peft.disable_adapter():
            return response_logits(self.module.peft, r)

    def values(self, r: Rollout) -> torch.Tensor:
        ids, mask, pos = r.model_inputs()
        self.use("critic")
        with self.autocast():
            return r.at_responses(self.module.value(self.hidden(ids, mask, pos)))

    def set_value_scale(self, mean: float, std: float) -> None:
        self.module.value_shift, self.module.value_scale = float(mean), float(std)

    def train_forward(self, u: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, pos = u.model_inputs()
        T = u.response_ids.shape[1]
        with self.autocast():
            logits, values = self.shared(ids, mask, pos, T + 1)
        return keep_last(logits, T + 1, ids.shape[1])[:, :-1], u.at_responses(values)

    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.use("reward")
        mask = mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.autocast():
            h = self.hidden(ids, mask, pos)  # (B, L, H)
            last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # (B,) last real token
            return self.module.reward_head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()

    # -- output ---------------------------------------------------------------------------
    def digest_models(self) -> tuple:
        return self.module.peft, self.module.value_head

    def final_models(self, cfg: PPOConfig, policy_path: str, tmp: Path) -> tuple:
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
        extra = {"adapter": lambda d: shutil.copytree(tmp / "adapters" / "actor", d, dirs_exist_ok=True)}
        return actor, critic, extra


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def check_reward_artifact(path: str, flag: str) -> Artifact:
    """A reward-model artifact with exactly one label (checked from its config.json; no weights read)."""
    art = check_artifact(path, REWARD_MODEL, flag)
    if not art.hub:
        conf = json.loads((Path(art.path) / "config.json").read_text(encoding="utf-8"))
        n = len(conf["id2label"]) if conf.get("id2label") else conf.get("num_labels", 2)  # transformers' default: 2
        if n != 1:
            raise UsageError(f"{flag} {path} is a sequence classifier with {n} labels, but a reward model has exactly "
                             f"one (num_labels=1, one score per sequence); train one with `llm reward --base DIR --out DIR`")
    return art


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id


def shared_reward_adapter(cfg: PPOConfig, policy: Artifact, reward: Artifact) -> str | None:
    """The reward adapter directory when all four roles can share one base, else None.

    That is: --lora/--qlora with share_base, and the reward artifact holds a
    LoRA adapter (OUT/adapter of `llm reward --lora`) trained over the very
    weights of the policy (its manifest's backbone digest equals the policy's).
    """
    if not (cfg.use_peft and cfg.share_base) or reward.hub or policy.hub:
        return None
    adapter = Path(reward.path) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        return None
    m = reward.manifest or {}
    backbone = m.get("init_from") or m.get("parent") or {}
    if backbone.get("digest") and backbone["digest"] == artifact_digest(Path(policy.path)):
        return str(adapter)
    return None


def load_roles(cfg: PPOConfig, policy: Artifact, reward: Artifact, critic: Artifact | None, say=print) -> Roles:
    """Load the four roles: separately, or on one shared base (see `SharedRoles`)."""
    policy_path, reward_path = policy.path, reward.path
    tok = load_tokenizer(policy_path)
    reward_tok = load_tokenizer(reward_path)
    same_tok = same_tokenizer(tok, reward_tok)

    shared = shared_reward_adapter(cfg, policy, reward) if same_tok and cfg.critic in ("reward", "policy") else None
    if shared:
        return _load_shared(cfg, policy_path, reward_path, shared, tok)
    if not same_tok:
        say("note: the policy and the reward model use different tokenizers; responses reach the reward model as text "
            "(decoded, then rendered with its own chat template and tokenizer)")

    # actor (and the reference)
    actor = load_for_training(policy_path, cfg)
    ref = None if cfg.use_peft else frozen(load_causal_lm(policy_path))

    # reward model
    rm = frozen(load_reward_model(reward_path))
    if rm.config.num_labels != 1:
        raise UsageError(f"--reward {cfg.reward} has {rm.config.num_labels} labels; a reward model has exactly one")
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = reward_tok.pad_token_id

    # critic
    source = {"reward": reward_path, "policy": policy_path}.get(cfg.critic, getattr(critic, "path", None))
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
    return Roles(actor, ref, rm, ValueModel(seqcls), tok=tok, reward_tok=reward_tok, same_tok=same_tok,
                 critic_source=source)


def _load_shared(cfg: PPOConfig, policy_path: str, reward_path: str, reward_adapter: str, tok) -> SharedRoles:
    base = load_for_training(policy_path, dataclasses.replace(cfg, lora=False))
    if hasattr(base, "peft_config"):  # load_for_training adds adapters only when asked; be sure
        base = base.get_base_model()
    model = get_peft_model(base, lora_config(cfg, model_config=base.config), adapter_name="actor")
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
        model.add_adapter("critic", lora_config(cfg, model_config=base.config))
    roles = SharedRoles(SharedBase(model, reward_head, value_head), tok=tok,
                        critic_source=reward_path if cfg.critic == "reward" else policy_path)
    roles.use("actor")
    return roles


def write_digest(out: Path, rank: int, step: int, roles: Roles) -> None:
    """OUT/digests/rank-R.json: this process's actor and critic weights digests (do processes agree?)."""
    actor, critic = roles.digest_models()
    (out / "digests").mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "digests" / f"rank-{rank}.json",
                      {"step": step, "actor": weights_digest(actor), "critic": weights_digest(critic)})


def weights_digest(model) -> str:
    """sha256 over a model's parameters (names and values), to compare processes."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
