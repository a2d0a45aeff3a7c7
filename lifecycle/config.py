"""One typed config per stage: the single source of defaults and help text.

A recipe YAML fills a config, command-line flags override it, and `validate`
reports every problem at once before any weights are loaded. The resolved
config is saved into the artifact's manifest. `lifecycle/cli.py` builds each
command's flags from these fields, so an option's name, type, default and help
are written here and nowhere else.

A stage's config is composed of shared groups, each a dataclass whose
`validate` checks its own fields and then hands on to the next group
(`super().validate()`), so a stage checks every group it is made of:

    TrainCommon    every training stage: output, seed, length, checkpoints, precision, tracking
    PeftCommon     LoRA and QLoRA (sft, reward, ppo)
    FinetunePeft   PeftCommon + DoRA and merging the adapter (sft, reward)
    ChatFormat     how prompts are read and rendered (sft, reward, ppo)
    TrlTraining    TrainCommon + the base model, data and optimisation of the TRL trainers (sft, reward)

The groups' fields stay flat on the stage's config (`cfg.lora_r`, `cfg.lr`).
Where a stage needs another default for a shared field, `shared(Group, name,
default)` restates only the default; the help stays with the group.

The defaults are the built-in world's CPU-sized recipe: `llm pretrain --out DIR`
with no other flag trains the default model. `recipes/default/*.yaml` restate
them with comments; a test checks that every shipped recipe loads.

How a recipe and flags fill these dataclasses (coercion, YAML, one-line errors) lives in
lifecycle/options.py; the loading functions are re-exported here.

This module imports no torch, so `llm --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from lifecycle.options import _at_least_one, _Checked, opt, shared

# What turns these declarations into configs (lifecycle/options.py), re-exported so that a stage imports its
# config class and the loading functions from one place.
from lifecycle.options import (  # noqa: F401
    _coerce, build_config, check_config, dump_yaml, field_default, field_types, parse_set, read_yaml, to_dict,
)


# ---------------------------------------------------------------------------
# Shared groups
# ---------------------------------------------------------------------------
@dataclass
class TrainCommon(_Checked):
    """Options every training stage shares."""

    out: str = opt("", "Output artifact directory (required).")
    seed: int = opt(0, "Random seed for data order, initialisation and sampling.")
    steps: int = opt(2000, "Optimizer steps of the recipe (overridden by --max-steps).")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means the recipe's length.")
    save_every: int = opt(200, "Write a checkpoint every N optimizer steps (0 disables periodic checkpoints).")
    keep_checkpoints: int = opt(2, "Keep only the newest K checkpoints under OUT/checkpoints.")
    resume: bool = opt(False, "Continue from the newest checkpoint under OUT/checkpoints.")
    mixed_precision: str = opt("no", "no | bf16 | fp16: autocast precision (fp16 uses loss scaling; GPU only).")
    report_to: str = opt("none", "none | tensorboard | wandb: also send metrics to this tracker.")
    log_every: int = opt(10, "Print a progress line every N optimizer steps.")
    force: bool = opt(False, "Run even if the memory estimate says the run does not fit the device.")
    overwrite: bool = opt(False, "Start afresh in an --out that holds another run's checkpoints, replacing them (without it such a run is refused; --resume continues it).")
    verify: bool = opt(False, "Check every input file's sha256 against its manifest before loading (sizes are always checked).")

    @property
    def total_steps(self) -> int:
        """The steps this run trains: --max-steps when given, else the recipe's `steps`."""
        return self.max_steps if self.max_steps > 0 else self.steps

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.out:
            p.append("--out is required (the directory the artifact is written to)")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            p.append(f"--out {self.out} is a file; give a directory path")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            p.append(f"mixed_precision={self.mixed_precision!r}; expected no, bf16 or fp16")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            p.append(f"report_to={self.report_to!r}; expected none, tensorboard or wandb")
        p += _at_least_one(self, ("steps", "keep_checkpoints", "log_every"))
        if self.max_steps == 0 or self.max_steps < -1:
            p.append(f"max_steps={self.max_steps}; must be positive (or -1 for the recipe's length)")
        if self.save_every < 0:
            p.append(f"save_every={self.save_every}; must be >= 0")
        if not 0 <= self.seed < 2**32:
            p.append(f"seed={self.seed}; must lie in [0, 2^32) (numpy's and torch's seed range)")
        return p


@dataclass
class PeftCommon(_Checked):
    """Adapter options shared by sft, reward and ppo: LoRA, and QLoRA (4-bit base + LoRA)."""

    lora: bool = opt(False, "Train LoRA adapters instead of all weights (ppo: on the actor, whose reference is then the actor with its adapter disabled).")
    qlora: bool = opt(False, "QLoRA: load the base in 4-bit NF4 (double quantization, bf16 compute) and train LoRA adapters on it.")
    lora_r: int = opt(8, "LoRA rank r: the width of the low-rank update B·A.")
    lora_alpha: int = opt(16, "LoRA alpha: the update is scaled by alpha / r.")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: 'all-linear' or comma-separated names (e.g. q_proj,v_proj).")

    @property
    def dora(self) -> bool:
        """DoRA is an option of sft and reward only (FinetunePeft); ppo trains plain LoRA. Code that builds
        adapters for any stage (modeling.lora_config) reads it from every config."""
        return False

    @property
    def use_peft(self) -> bool:
        return self.lora or self.qlora or self.dora

    def validate(self) -> list[str]:
        p = super().validate()
        if self.lora and self.qlora:
            p.append("--lora and --qlora both given; pick one (--qlora already trains LoRA adapters, on a 4-bit base)")
        if self.lora_r < 1:
            p.append(f"lora_r={self.lora_r}; must be at least 1")
        if self.lora_alpha <= 0:
            p.append(f"lora_alpha={self.lora_alpha}; must be positive")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout={self.lora_dropout}; expected a value in [0, 1)")
        if not self.lora_target_modules.strip():
            p.append("lora_target_modules is empty; use 'all-linear' or names such as q_proj,v_proj")
        return p


@dataclass
class FinetunePeft(PeftCommon):
    """PeftCommon plus what only the TRL stages (sft, reward) offer: DoRA, and writing the merged model."""

    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output feature); implies --lora unless --qlora.")
    merge: bool = opt(True, "Also write the adapter merged into the base as a plain model at OUT (--no-merge keeps only OUT/adapter).")


@dataclass
class ChatFormat(_Checked):
    """How prompts are read from user data and rendered (sft, reward, ppo)."""

    prompt_column: str = opt("prompt", "Column with the prompt: a string or a list of {role, content} messages (rendered with the chat template); optional for reward pairs.")
    chat_template: bool = opt(True, "Treat plain-string prompts as a user turn (and responses as an assistant turn), so the tokenizer's chat template applies (false: use them as raw text).")


@dataclass
class TrlTraining(TrainCommon):
    """TrainCommon plus the base model, data, length and optimisation of the TRL-trained stages (sft, reward)."""

    # --- input ---
    base: str = opt("", "Causal-LM artifact to start from (`llm pretrain` or `llm sft` output) or a hub model id; on the built-in world, reward also samples its pairs from it.")
    data: list = opt([], "Training data: .jsonl/.json/.csv/.parquet files or a datasets hub id (sft: conversations or prompt/completion; reward: prompt/chosen/rejected; see docs/data.md); empty = built-in world.")
    max_length: int = opt(128, "Tokens per sequence at most; longer ones are cut and counted (sft keeps the start, reward the end, where the score is read). With packing: the block length.")
    eval_fraction: float = opt(0.05, "Share of user rows held out for evaluation (the built-in world has its own held-out problems).")
    # --- optimisation ---
    steps: int = opt(600, "Optimizer steps of the recipe (overridden by --max-steps; ignored when epochs > 0).")
    batch_size: int = opt(32, "Examples per micro-batch per process (reward: preference pairs, two sequences each).")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimizer step.")
    epochs: float = opt(0.0, "If > 0, train this many passes over the data instead of `steps`.")
    lr: float = opt(3e-4, "Peak learning rate (large models want ~2e-5 full, ~2e-4 LoRA).")
    lr_scheduler: str = opt("cosine", "cosine | linear | constant | constant_with_warmup (decay to 0 at the last step).")
    warmup_steps: int = opt(20, "Linear warmup steps from 0 to lr.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory (slower; useful for big models).")
    cpu_threads: int = opt(0, "torch CPU threads without a GPU; 0: torch's default, one per core or OMP_NUM_THREADS. On an idle 2-core machine two threads ran the default recipes 1.3-1.8x faster with bit-identical weights; beside other jobs on the same cores, set 1 (two threads ran 3-4x slower there).")
    # --- evaluation ---
    eval_every: int = opt(200, "Evaluate on the held-out set every N optimizer steps (sft: loss, and gold accuracy on the built-in world; reward: pairwise accuracy).")
    eval_batch_size: int = opt(64, "Examples per evaluation batch (reward: pairs).")

    inherits_max_length: ClassVar[bool] = False  # sft: max_length 0 takes the parent's training length

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.base:
            p.append("--base is required (the causal-LM artifact to start from, e.g. runs/default/pretrain)")
        p += _at_least_one(self, ("batch_size", "grad_accum", "eval_every", "eval_batch_size"))
        if self.max_length < (0 if self.inherits_max_length else 1):
            p.append(f"max_length={self.max_length}; must be at least 1" + (" (0: the parent's training length)" if self.inherits_max_length else ""))
        if self.epochs < 0:
            p.append(f"epochs={self.epochs}; must be >= 0 (0 means: train `steps` steps)")
        if not 0 < self.lr < 1:
            p.append(f"lr={self.lr}; expected a value in (0, 1)")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps={self.warmup_steps}; must be >= 0")
        if self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay}; must be >= 0")
        if self.grad_clip < 0:
            p.append(f"grad_clip={self.grad_clip}; must be >= 0 (0 disables clipping)")
        if self.lr_scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
            p.append(f"lr_scheduler={self.lr_scheduler!r}; expected cosine, linear, constant or constant_with_warmup")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"eval_fraction={self.eval_fraction}; expected a value in [0, 1)")
        if self.cpu_threads < 0:
            p.append(f"cpu_threads={self.cpu_threads}; must be >= 0 (0: torch's default)")
        return p


# ---------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------
@dataclass
class PretrainConfig(TrainCommon):
    """`llm pretrain`: train a decoder-only model from scratch."""

    # --- data ---
    data: list = opt([], "Training text: local .txt/.jsonl/.json/.csv/.parquet files or a datasets hub id; empty = built-in world.")
    text_column: str = opt("text", "Column holding the text in jsonl/json/csv/parquet/hub data.")
    eval_fraction: float = opt(0.02, "Share of user documents held out for evaluation (the built-in world has its own held-out split).")
    world_documents: int = opt(60000, "Built-in world: number of pretraining documents to generate.")
    # --- tokenizer ---
    tokenizer: str = opt("", "Reuse this tokenizer (directory or hub id) instead of training a new one.")
    vocab_size: int = opt(512, "Vocabulary size of the byte-level BPE tokenizer trained on the corpus.")
    vocab_multiple: int = opt(1, "Round the model's vocabulary up to a multiple of this (64 on a GPU: the output layer's matmul then runs on whole tensor-core tiles, as nanoGPT's 50304 for GPT-2's 50257); the extra rows are never a token.")
    # --- model ---
    model: str = opt("llama-tiny", "A preset name (an unknown name lists them all) or a path to a transformers config.json.")
    seq_len: int = opt(64, "Tokens per training block (documents are joined with EOS and packed).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    compile: bool = opt(False, "torch.compile the model.")
    # --- optimisation (the recipe's length, `steps`, is TrainCommon's) ---
    batch_size: int = opt(32, "Blocks per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimizer step.")
    lr: float = opt(3e-3, "Peak learning rate.")
    min_lr: float = opt(3e-4, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = opt(100, "Linear warmup steps from 0 to lr.")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only (not norms, biases).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    # --- evaluation ---
    eval_every: int = opt(400, "Evaluate held-out loss every N steps.")
    eval_batches: int = opt(16, "Micro-batches of held-out blocks per evaluation.")
    sample_prompt: str = opt("the sum of 48 and 87 is", "Prompt for the greedy sample printed at each evaluation.")

    def validate(self) -> list[str]:
        p = super().validate()
        p += _at_least_one(self, ("seq_len", "batch_size", "grad_accum", "vocab_size", "vocab_multiple", "eval_every", "eval_batches"))
        if not 0 < self.lr < 1:
            p.append(f"lr={self.lr}; expected a value in (0, 1)")
        if not 0 <= self.min_lr <= self.lr:
            p.append(f"min_lr={self.min_lr}; must lie in [0, lr]")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps={self.warmup_steps}; must be >= 0")
        if not 0 < self.eval_fraction < 1:
            p.append(f"eval_fraction={self.eval_fraction}; expected a value in (0, 1)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}; expected a value in [0, 1)")
        if self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay}; must be >= 0")
        if self.grad_clip < 0:
            p.append(f"grad_clip={self.grad_clip}; must be >= 0 (0 disables clipping)")
        if self.vocab_size < 300 and not self.tokenizer:
            p.append(f"vocab_size={self.vocab_size}; a byte-level BPE needs at least 300 (256 bytes + specials + merges)")
        return p


# ---------------------------------------------------------------------------
# Supervised fine-tuning and reward modelling (TRL trainers)
# ---------------------------------------------------------------------------
@dataclass
class SFTConfig(FinetunePeft, ChatFormat, TrlTraining):
    """`llm sft`: supervised fine-tuning on instructions with TRL's SFTTrainer (full, LoRA, QLoRA or DoRA)."""

    messages_column: str = opt("messages", "Column with a conversation: a list of {role, content} messages.")
    completion_column: str = opt("completion", "Column with the completion (a string or a list of messages), paired with prompt_column.")
    text_column: str = opt("text", "Column with plain text (language-modelling loss on every token).")
    max_length: int = opt(0, "Tokens per sequence at most; longer ones are cut (keeping the start) and counted. 0: the length the parent was trained at (its pretraining seq_len or sft max_length), capped by the model's context; 2048 for a hub model. With packing: the block length.")
    inherits_max_length: ClassVar[bool] = True
    loss_on: str = opt("assistant", "assistant: loss on assistant/completion tokens only; all: on every token (prompts too).")
    packing: bool = opt(False, "Pack several examples into each max_length block (fewer pad tokens; examples do not attend to each other).")
    world_examples: int = opt(1500, "Built-in world: sloppy-labelled training examples to generate.")
    eval_problems: int = opt(500, "Built-in world: held-out problems for eval loss (sloppy labels) and greedy gold_accuracy (0 skips both).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.loss_on not in ("assistant", "all"):
            p.append(f"loss_on={self.loss_on!r}; expected assistant or all")
        if self.world_examples < 1:
            p.append(f"world_examples={self.world_examples}; must be at least 1")
        if self.eval_problems < 0:
            p.append(f"eval_problems={self.eval_problems}; must be >= 0")
        return p


@dataclass
class RewardConfig(FinetunePeft, ChatFormat, TrlTraining):
    """`llm reward`: train a reward model (one score per sequence) on preference pairs with TRL's RewardTrainer."""

    init_from: str = opt("", "Initialise the reward model's backbone from this causal-LM artifact instead of --base (pairs are still sampled from --base).")
    chosen_column: str = opt("chosen", "Column with the preferred response (a string or a list of messages).")
    rejected_column: str = opt("rejected", "Column with the dispreferred response (a string or a list of messages).")
    world_prompts: int = opt(9500, "Built-in world: training prompts (9500 = every training problem); each gives one pair from the --base model's own samples.")
    world_samples: int = opt(2, "Built-in world: samples per prompt drawn from --base at temperature `sample_temperature`.")
    sample_temperature: float = opt(1.0, "Built-in world: sampling temperature for the pairs.")
    eval_problems: int = opt(500, "Built-in world: held-out problems whose pairs measure eval_accuracy.")
    center_rewards: float = opt(0.0, "Coefficient of a penalty on the mean squared score, keeping scores centred on 0 (0.01 is typical; 0 disables).")
    # The reward recipe's own defaults for shared options (tuned on the default base: 9,500 pairs).
    steps: int = shared(TrlTraining, "steps", 750)
    batch_size: int = shared(TrlTraining, "batch_size", 64)
    lr: float = shared(TrlTraining, "lr", 7e-4)
    warmup_steps: int = shared(TrlTraining, "warmup_steps", 30)
    eval_every: int = shared(TrlTraining, "eval_every", 250)
    eval_batch_size: int = shared(TrlTraining, "eval_batch_size", 128)

    def validate(self) -> list[str]:
        p = super().validate()
        p += _at_least_one(self, ("world_prompts", "world_samples", "eval_problems"))
        if self.sample_temperature <= 0:
            p.append(f"sample_temperature={self.sample_temperature}; must be > 0")
        if self.center_rewards < 0:
            p.append(f"center_rewards={self.center_rewards}; must be >= 0")
        return p


# ---------------------------------------------------------------------------
# RLHF with PPO (our own loop: lifecycle/stages/ppo.py, math in lifecycle/rl.py)
# ---------------------------------------------------------------------------
@dataclass
class PPOConfig(PeftCommon, ChatFormat, TrainCommon):
    """`llm ppo`: RLHF with PPO against a reward model (actor, frozen reference, frozen reward model, critic)."""

    # --- roles ---
    policy: str = opt("", "Causal-LM artifact to improve (usually the sft output) or a hub id: initialises the actor and is the frozen reference.")
    reward: str = opt("", "Reward-model artifact (`llm reward` output: a one-label sequence classifier) or a hub id; frozen.")
    critic: str = opt("reward", "Where the critic (per-token value head) starts: reward (the reward model, as in InstructGPT), policy (the policy's backbone + a new zero head) or a sequence-classifier directory.")
    critic_lora: bool = opt(False, "With --lora/--qlora: train the critic as a LoRA adapter (+ its value head) too, instead of all its weights.")
    share_base: bool = opt(True, "With --lora/--qlora, when the reward model is a LoRA adapter over the policy's own weights: keep one (optionally 4-bit) copy of those weights for all four roles.")
    # --- prompts ---
    prompts: str = opt("", "Prompt file (.jsonl/.json/.csv/.parquet/.txt) or datasets hub id; empty = the built-in world's training problems.")
    world_prompts: int = opt(4000, "Built-in world: number of training prompts to draw rollouts from.")
    eval_prompts: int = opt(500, "Held-out prompts for evaluation (built-in world: its held-out problems; user prompts: the last ones, kept out of training).")
    # --- rollouts ---
    prompts_per_rollout: int = opt(128, "Prompts per rollout batch, over all processes (one response each); must divide by the number of processes.")
    max_new_tokens: int = opt(5, "Response tokens at most; a response that has not emitted EOS by then counts as never ending.")
    temperature: float = opt(1.0, "Sampling temperature for rollouts (log-probabilities are taken at the same temperature).")
    top_k: int = opt(0, "Sample among the k most likely tokens during rollouts (0: off; PPO's ratios assume the untruncated distribution).")
    top_p: float = opt(1.0, "Nucleus sampling for rollouts (1: off).")
    missing_eos_penalty: float = opt(1.0, "Subtracted from the (normalised) score of a response that never emits EOS (0 disables).")
    normalize_reward: bool = opt(True, "Divide scores by the first rollout's std after subtracting its mean, then hold both fixed.")
    # --- KL penalty ---
    kl_coef: float = opt(0.15, "β: per-token penalty -β·(log π - log π_ref). The study's safe value; 0.05 got the reward model hacked.")
    kl_estimator: str = opt("k1", "Per-token KL estimator: k1 (log-ratio), k2 (½ log-ratio²) or k3 ((ρ-1) - log ρ, GRPO's). In the reward only k1 gives KL's gradient (k2/k3 estimate its value, not its gradient: Tang & Munos 2025); with kl_in_loss use k3 or k2.")
    kl_in_loss: bool = opt(False, "Put β·KL in the actor's loss (differentiated, as GRPO does) instead of in the reward; needs kl_estimator k3 (gradient of KL(π_ref‖π)) or k2 (gradient of KL(π‖π_ref)).")
    adaptive_kl: bool = opt(False, "Adapt β towards kl_target (Ziegler et al. 2019) instead of holding it fixed.")
    kl_target: float = opt(1.0, "Adaptive KL: target KL per response, in nats.")
    kl_horizon: int = opt(10000, "Adaptive KL: horizon in episodes (β moves by at most 20% × episodes / horizon per rollout).")
    # --- PPO update ---
    ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    minibatch_size: int = opt(64, "Episodes per optimizer step, over all processes (prompts_per_rollout / minibatch_size minibatches per epoch).")
    micro_batch_size: int = opt(64, "Episodes per forward/backward on one process; gradients of a minibatch accumulate over its micro-batches.")
    rollout_micro_batch_size: int = opt(0, "Episodes per chunk of a rollout on one process: generation and the actor, reference, critic and reward passes run this many at a time (0: the whole rollout batch at once).")
    gradient_checkpointing: bool = opt(False, "Recompute actor and critic activations in backward to save memory (their dropout is set to 0 and they stay in train mode).")
    lr: float = opt(5e-5, "Actor learning rate (AdamW; scaled by lr_scheduler).")
    critic_lr: float = opt(3e-4, "Critic learning rate (AdamW; scaled by lr_scheduler).")
    lr_scheduler: str = opt("constant", "constant | linear | cosine: the learning-rate multiplier of actor and critic over PPO iterations (decaying towards 0 at the last).")
    warmup_steps: int = opt(0, "Linear learning-rate warmup over this many PPO iterations.")
    weight_decay: float = opt(0.0, "AdamW weight decay for actor and critic.")
    grad_clip: float = opt(1.0, "Clip each model's gradient norm to this value (0 disables).")
    clip_range: float = opt(0.2, "ε of the clipped surrogate: ratios outside [1-ε, 1+ε] get no gradient.")
    value_clip: float = opt(0.2, "Clip the critic's change from its rollout values to ±this (0 disables).")
    gamma: float = opt(1.0, "GAE discount γ.")
    lam: float = opt(0.95, "GAE λ.")
    whiten_advantages: bool = opt(True, "Whiten advantages over each rollout batch.")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient in the actor loss (0 disables).")
    target_kl: float = opt(0.0, "Early stop: once a minibatch's approximate KL(π_old || π) exceeds this, skip its step and the rest of this iteration's epochs (0 disables).")
    steps: int = opt(100, "PPO iterations of the recipe (one rollout batch + its epochs each; overridden by --max-steps).")
    # --- evaluation ---
    eval_every: int = opt(25, "Held-out evaluation (mean RM score, gold accuracy on the built-in world, KL) every N iterations, plus before and after.")
    # --- guards ---
    strict: bool = opt(False, "Refuse to start when the reward-model quality gate fails (default: warn).")
    gate_min_accuracy: float = opt(0.7, "Quality gate: lowest acceptable held-out pairwise accuracy (the reward manifest's eval_accuracy).")
    gate_max_length_corr: float = opt(0.5, "Quality gate: highest acceptable |correlation| of the RM score with response length, measured between two sampled responses to the same prompt (score difference vs length difference).")
    gate_samples: int = opt(256, "Quality gate: responses sampled (two per prompt) to measure the length correlation.")
    stop_on_collapse: bool = opt(False, "When the watchdog raises an alarm, save a checkpoint and stop (default: warn and go on).")
    watch_negative_kl: float = opt(0.2, "Watchdog: alarm when the batch's mean KL to the reference falls below minus this (nats).")
    watch_length_drift: float = opt(0.5, "Watchdog: alarm when mean response length moves more than this fraction from the first rollout's.")
    watch_distinct: float = opt(0.5, "Watchdog: alarm when distinct-2 of the responses falls below this fraction of the first rollout's.")
    watch_eos_rate: float = opt(0.5, "Watchdog: alarm when fewer than this share of responses end with EOS.")
    watch_entropy: float = opt(0.1, "Watchdog: alarm when per-token entropy falls below this fraction of the first rollout's.")
    watch_hack_gold_drop: float = opt(0.05, "Watchdog (built-in world): flag reward hacking when held-out gold accuracy falls this much below its best while the RM score is above its value then.")
    # --- misc ---
    save_every: int = opt(50, "Write a checkpoint every N PPO iterations (0 disables periodic checkpoints).")
    log_every: int = opt(1, "Print a progress line every N PPO iterations (OUT/log.jsonl gets every iteration).")
    explain: bool = opt(False, "Print the batch hierarchy and the memory estimate of the four roles, then exit.")
    debug_digest: bool = opt(False, "Write OUT/digests/rank-R.json with a sha256 of this process's actor and critic weights after each step (checks that processes agree).")

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.policy:
            p.append("--policy is required (the causal-LM artifact to improve, e.g. runs/default/sft)")
        if not self.reward:
            p.append("--reward is required (the reward-model artifact, e.g. runs/default/reward)")
        if not self.critic:
            p.append("critic is empty; use reward, policy or a sequence-classifier directory")
        p += _at_least_one(self, ("prompts_per_rollout", "max_new_tokens", "ppo_epochs", "minibatch_size", "micro_batch_size",
                                  "eval_every", "eval_prompts", "world_prompts", "gate_samples", "kl_horizon"))
        if self.minibatch_size >= 1 and self.prompts_per_rollout % self.minibatch_size:
            p.append(f"prompts_per_rollout={self.prompts_per_rollout} is not a multiple of minibatch_size={self.minibatch_size}")
        for name in ("lr", "critic_lr"):
            if not 0 < getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}; expected a value in (0, 1)")
        if self.temperature <= 0:
            p.append(f"temperature={self.temperature}; must be > 0 (PPO needs sampled responses)")
        if self.top_k < 0:
            p.append(f"top_k={self.top_k}; must be >= 0")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p={self.top_p}; must lie in (0, 1]")
        if self.kl_coef < 0:
            p.append(f"kl_coef={self.kl_coef}; must be >= 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            p.append(f"kl_estimator={self.kl_estimator!r}; expected k1, k2 or k3")
        elif self.kl_in_loss and self.kl_estimator == "k1":
            p.append("kl_in_loss with kl_estimator=k1: its expected gradient is 0; set kl_estimator=k3 (as GRPO) or k2")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            p.append(f"lr_scheduler={self.lr_scheduler!r}; expected constant, linear or cosine")
        for name in ("warmup_steps", "rollout_micro_batch_size"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}; must be >= 0")
        if self.adaptive_kl and self.kl_target <= 0:
            p.append(f"kl_target={self.kl_target}; must be > 0 with adaptive_kl")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            p.append(f"gamma={self.gamma}, lam={self.lam}; both must lie in [0, 1]")
        for name in ("clip_range", "value_clip", "entropy_coef", "target_kl", "grad_clip", "weight_decay", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}; must be >= 0")
        if self.clip_range == 0:
            p.append("clip_range=0 freezes the policy; use a value such as 0.2")
        for name in ("gate_min_accuracy", "gate_max_length_corr", "watch_length_drift", "watch_distinct",
                     "watch_eos_rate", "watch_entropy", "watch_hack_gold_drop"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"{name}={getattr(self, name)}; expected a value in [0, 1]")
        if self.watch_negative_kl < 0:
            p.append(f"watch_negative_kl={self.watch_negative_kl}; must be >= 0")
        return p


# ---------------------------------------------------------------------------
# DPO and GRPO: the alignment methods beside PPO (TRL trainers: lifecycle/stages/dpo.py, grpo.py; docs/alignment.md)
# ---------------------------------------------------------------------------
@dataclass
class DPOConfig(FinetunePeft, ChatFormat, TrlTraining):
    """`llm dpo`: direct preference optimisation (Rafailov et al. 2023) on preference pairs with TRL's DPOTrainer; the reference is --base (with adapters: the adapter disabled)."""

    chosen_column: str = shared(RewardConfig, "chosen_column")
    rejected_column: str = shared(RewardConfig, "rejected_column")
    beta: float = opt(0.1, "β: the strength of the implicit KL penalty; the implicit reward is β·log(π/π_ref). Lower lets the policy move further from the reference (IPO: its τ).")
    loss_type: str = opt("sigmoid", "sigmoid (DPO's -log σ(β·Δ)) | ipo ((Δ - 1/(2τ))², Azar et al. 2023) | hinge (SLiC) | robust (label noise, with label_smoothing).")
    label_smoothing: float = opt(0.0, "With loss_type robust: the assumed probability that a pair's preference is flipped, in [0, 0.5).")
    sft_weight: float = opt(1.0, "Weight of a negative log-likelihood term on the chosen responses added to the loss (RPO, Pang et al. 2024): keeps DPO from lowering the chosen answers' own likelihood (0 disables).")
    world_prompts: int = opt(2000, "Built-in world: training problems; each gives one pair from --base's own samples, judged by the gold checker (as `llm reward` makes them).")
    world_samples: int = shared(RewardConfig, "world_samples", 4)
    sample_temperature: float = shared(RewardConfig, "sample_temperature")
    eval_problems: int = opt(500, "Built-in world: held-out problems whose pairs measure preference accuracy and margin, and on which greedy gold accuracy and KL to the reference are measured (0 skips them).")
    kl_samples: int = opt(128, "Held-out prompts whose sampled responses measure KL(π || π_ref) before and after (0 skips it).")
    # DPO's own defaults for shared options (tuned on the default SFT model; recipes/default/dpo.yaml).
    steps: int = shared(TrlTraining, "steps", 120)
    batch_size: int = shared(TrlTraining, "batch_size", 32)
    lr: float = shared(TrlTraining, "lr", 2e-4)
    warmup_steps: int = shared(TrlTraining, "warmup_steps", 10)
    max_length: int = shared(TrlTraining, "max_length", 64)
    eval_every: int = shared(TrlTraining, "eval_every", 60)
    eval_batch_size: int = shared(TrlTraining, "eval_batch_size", 128)

    def validate(self) -> list[str]:
        p = super().validate()
        if self.beta <= 0:
            p.append(f"beta={self.beta}; must be > 0")
        if self.loss_type not in ("sigmoid", "ipo", "hinge", "robust"):
            p.append(f"loss_type={self.loss_type!r}; expected sigmoid, ipo, hinge or robust")
        if not 0 <= self.label_smoothing < 0.5:
            p.append(f"label_smoothing={self.label_smoothing}; expected a value in [0, 0.5)")
        elif self.label_smoothing and self.loss_type != "robust":
            p.append(f"label_smoothing={self.label_smoothing} applies to loss_type robust only; set loss_type=robust or drop it")
        if self.sft_weight < 0:
            p.append(f"sft_weight={self.sft_weight}; must be >= 0")
        p += _at_least_one(self, ("world_prompts", "world_samples"))
        if self.sample_temperature <= 0:
            p.append(f"sample_temperature={self.sample_temperature}; must be > 0")
        for name in ("eval_problems", "kl_samples"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}; must be >= 0")
        return p


@dataclass
class GRPOConfig(FinetunePeft, ChatFormat, TrlTraining):
    """`llm grpo`: group relative policy optimisation (Shao et al. 2024) with TRL's GRPOTrainer: rewards from a reward model, the built-in gold checker or your function."""

    base: str = opt("", "Causal-LM artifact to improve (usually the sft output) or a hub id; with kl_coef > 0 also the frozen reference.", flag="--policy")
    reward: str = opt("", "Reward-model artifact (`llm reward` output) that scores each response; or give reward_fn.")
    reward_fn: str = opt("", "gold: the built-in world's gold checker (1 right, 0 wrong: a verifiable reward) | module:function, called as function(prompts, completions, **kw) -> one float per completion (TRL's reward-function form).")
    prompts: str = shared(PPOConfig, "prompts")
    world_prompts: int = shared(PPOConfig, "world_prompts")
    eval_prompts: int = shared(PPOConfig, "eval_prompts")
    num_generations: int = opt(8, "Group size G: responses sampled per prompt; each one's advantage is its reward minus the group's mean (over the group's std).")
    prompts_per_step: int = opt(16, "Prompts per optimizer step (batch_size x grad_accum = prompts_per_step x num_generations responses).")
    max_new_tokens: int = shared(PPOConfig, "max_new_tokens")
    temperature: float = opt(1.0, "Sampling temperature of the groups (log-probabilities are taken at the same temperature).")
    kl_coef: float = opt(0.3, "β of the KL penalty β·KL(π || π_ref) in the loss (k3 estimator, as the paper); 0 loads no reference.")
    clip_range: float = shared(PPOConfig, "clip_range")
    num_iterations: int = opt(1, "μ: optimizer passes over each batch of groups (1: on-policy, the ratio is 1 and clipping idle).")
    loss_type: str = opt("grpo", "grpo (each response's token mean, as the paper) | dr_grpo (sum over a fixed length: no length bias) | dapo (token mean over the batch) | bnpo.")
    scale_rewards: str = opt("group", "group: divide advantages by the group's std (the paper) | batch: by the batch's std | none (Dr. GRPO).")
    missing_eos_penalty: float = opt(1.0, "With --reward: subtracted from the score of a response that never emits EOS (0 disables); the gold checker scores those 0 already.")
    watch_zero_std: float = opt(0.5, "Watchdog: warn when more than this share of a step's groups have zero reward variance (they carry no gradient).")
    watch_hack_gold_drop: float = shared(PPOConfig, "watch_hack_gold_drop")
    stop_on_collapse: bool = shared(PPOConfig, "stop_on_collapse")
    # GRPO's own defaults for shared options (tuned on the default SFT model; recipes/default/grpo.yaml).
    steps: int = shared(TrlTraining, "steps", 150)
    batch_size: int = shared(TrlTraining, "batch_size", 128)
    lr: float = shared(TrlTraining, "lr", 3e-5)
    warmup_steps: int = shared(TrlTraining, "warmup_steps", 0)
    lr_scheduler: str = shared(TrlTraining, "lr_scheduler", "constant")
    max_length: int = shared(TrlTraining, "max_length", 64)
    eval_every: int = shared(TrlTraining, "eval_every", 25)
    save_every: int = shared(TrlTraining, "save_every", 50)
    log_every: int = shared(TrlTraining, "log_every", 1)

    def validate(self) -> list[str]:
        p = [x for x in super().validate() if not x.startswith("--base is required")]
        if not self.base:
            p.insert(0, "--policy is required (the causal-LM artifact to improve, e.g. runs/default/sft)")
        if self.data:
            p.append("grpo samples its own responses to prompts: give the prompt file as --prompts, not --data")
        if not self.reward and not self.reward_fn:
            p.append("--reward or --reward-fn is required (a reward-model artifact, or gold, or module:function)")
        elif self.reward and self.reward_fn:
            p.append("both --reward and --reward-fn given; pick one source of rewards")
        if self.reward_fn and self.reward_fn != "gold" and ":" not in self.reward_fn:
            p.append(f"reward_fn={self.reward_fn!r}; expected gold or module:function (e.g. my_rewards:score)")
        p += _at_least_one(self, ("prompts_per_step", "max_new_tokens", "num_iterations", "world_prompts", "eval_prompts"))
        if self.num_generations < 2:
            p.append(f"num_generations={self.num_generations}; a group needs at least 2 responses (advantages are relative to the group)")
        elif self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size * self.grad_accum != self.prompts_per_step * self.num_generations:
            p.append(f"batch_size x grad_accum = {self.batch_size * self.grad_accum} responses per step, but prompts_per_step x "
                     f"num_generations = {self.prompts_per_step * self.num_generations}; make them equal")
        elif self.batch_size >= 1 and self.batch_size % self.num_generations:
            p.append(f"batch_size={self.batch_size} is not a multiple of num_generations={self.num_generations}")
        if self.temperature <= 0:
            p.append(f"temperature={self.temperature}; must be > 0 (GRPO needs sampled responses)")
        if self.kl_coef < 0 or self.missing_eos_penalty < 0:
            p.append("kl_coef and missing_eos_penalty must be >= 0")
        if self.clip_range <= 0:
            p.append(f"clip_range={self.clip_range}; must be > 0")
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo"):
            p.append(f"loss_type={self.loss_type!r}; expected grpo, dr_grpo, dapo or bnpo")
        if self.scale_rewards not in ("group", "batch", "none"):
            p.append(f"scale_rewards={self.scale_rewards!r}; expected group, batch or none")
        for name in ("watch_zero_std", "watch_hack_gold_drop"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"{name}={getattr(self, name)}; expected a value in [0, 1]")
        return p



# ---------------------------------------------------------------------------
# `llm data` (the steps are lifecycle/data/prep/; see docs/data-prep.md)
# ---------------------------------------------------------------------------
@dataclass
class DataConfig(_Checked):
    """`llm data`: prepare a pretraining corpus: read, deduplicate, filter, scrub PII, decontaminate, mix, write shards."""

    # --- inputs and output ---
    source: list = opt([], "An input as NAME=PATH[:WEIGHT] (repeatable): a file (.txt/.jsonl/.jsonl.gz/.jsonl.zst/.json/.csv/.parquet), a directory of them or a datasets hub id; WEIGHT is the source's share of the mixture (default 1).")
    eval_set: list = opt([], "Evaluation data to decontaminate against (repeatable): a file of any readable type; every string field of a row is part of its item.")
    out: str = opt("", "Output directory: shards/, data.json (the manifest) and report.md (required).")
    text_column: str = opt("text", "Column holding the text in jsonl/json/csv/parquet/hub sources.")
    output_format: str = opt("parquet", "parquet | jsonl: the type of the output shards.")
    shard_size: int = opt(10000, "Documents per shard: the unit of parallel work, of the cache and of the output files.")
    num_proc: int = opt(1, "Worker processes for the per-shard steps (normalising, signatures, filters, scrubbing, decontamination, counting).")
    cache_dir: str = opt("", "Where finished steps are kept, keyed by input digests and step settings, so a rerun skips them; empty: OUT/.cache; none: no cache.")
    seed: int = opt(0, "Seed of the mixture's draws.")
    # --- 1. read ---
    unicode_form: str = opt("NFC", "NFC | NFKC | none: Unicode normalisation applied on reading (whitespace is always normalised: spaces collapsed, one blank line between paragraphs).")
    # --- 2. deduplicate ---
    exact_dedup: bool = opt(True, "Drop documents whose normalised text is identical to an earlier one (hash of the text; the first one is kept).")
    near_dedup: bool = opt(True, "Drop near duplicates found by MinHash LSH (datasketch) over word n-gram shingles; the first of each group is kept.")
    minhash_threshold: float = opt(0.6, "Near dedup: Jaccard similarity of the shingle sets around which LSH starts reporting pairs (datasketch's optimal band layout; 0.6 finds 96% of 100-160-word copies with 3 words changed, 0.7 only 82%).")
    minhash_ngram: int = opt(5, "Near dedup: words per shingle (lower-cased, punctuation removed).")
    minhash_perm: int = opt(128, "Near dedup: permutations of the MinHash signature (more: a sharper threshold, slower).")
    # --- 3. quality (Gopher rules, Rae et al. 2021, appendix A) ---
    quality: bool = opt(True, "Apply the Gopher quality and repetition rules (off for the built-in world, whose documents are ~25 words of templated sentences).")
    min_words: int = opt(50, "Quality: fewest words in a document.")
    max_words: int = opt(100000, "Quality: most words in a document.")
    min_mean_word_length: float = opt(3.0, "Quality: shortest mean word length (characters).")
    max_mean_word_length: float = opt(10.0, "Quality: longest mean word length (characters).")
    max_symbol_word_ratio: float = opt(0.1, "Quality: highest ratio of '#' and ellipsis symbols to words.")
    max_bullet_lines: float = opt(0.9, "Quality: highest share of lines that start with a bullet.")
    max_ellipsis_lines: float = opt(0.3, "Quality: highest share of lines that end with an ellipsis.")
    min_alpha_words: float = opt(0.8, "Quality: lowest share of words with at least one alphabetic character.")
    min_stop_words: int = opt(2, "Quality: fewest occurrences of the English stop words the, be, to, of, and, that, have, with (0 disables, for other languages).")
    max_dup_line_fraction: float = opt(0.3, "Quality: highest share of lines that repeat an earlier line (and of paragraphs that repeat one).")
    max_dup_line_chars: float = opt(0.2, "Quality: highest share of characters in repeated lines (and in repeated paragraphs).")
    top_ngram_chars: str = opt("2:0.20,3:0.18,4:0.16", "Quality: n:fraction pairs; drop when the most frequent word n-gram covers more than the fraction of characters.")
    dup_ngram_chars: str = opt("5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.10", "Quality: n:fraction pairs; drop when repeated word n-grams cover more than the fraction of characters.")
    # --- 4. PII ---
    pii: bool = opt(True, "Replace e-mail addresses, phone numbers, IPv4/IPv6 addresses and Luhn-valid card numbers with <EMAIL>, <PHONE>, <IP_ADDRESS>, <CREDIT_CARD>.")
    # --- 5. decontaminate ---
    decontaminate: bool = opt(True, "Drop documents that share a word n-gram with an evaluation item (the --eval-set files, and the built-in world's held-out problems with world_heldout).")
    decontam_ngram: int = opt(13, "Decontamination: n-gram length in words after normalisation (lower case, no punctuation, line breaks as spaces); an item shorter than n matches as a whole.")
    decontam_min_words: int = opt(5, "Decontamination: items shorter than this many words are skipped (they would match ordinary text).")
    world_heldout: bool = opt(True, "Decontaminate against the built-in world's 500 held-out problems in every phrasing the world uses.")
    # --- 6. mixture ---
    target_tokens: int = opt(0, "Tokens of the mixed corpus, split by the sources' weights (a source short of its share is repeated, each pass a new shuffle); 0: the largest mixture that repeats nothing, or everything once when no weight is given.")
    tokenizer: str = opt("", "Count tokens with this tokenizer (a directory with tokenizer.json, or the file); empty: whitespace-separated words.")

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.out:
            p.append("--out is required (the directory the corpus is written to)")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            p.append(f"--out {self.out} is a file; give a directory path")
        if not self.source:
            p.append("no --source given; pass at least one, e.g. --source web=crawl.jsonl.gz:0.7")
        if self.output_format not in ("parquet", "jsonl"):
            p.append(f"output_format={self.output_format!r}; expected parquet or jsonl")
        if self.unicode_form.upper() not in ("NFC", "NFKC", "NONE"):
            p.append(f"unicode_form={self.unicode_form!r}; expected NFC, NFKC or none")
        p += _at_least_one(self, ("shard_size", "num_proc", "minhash_ngram", "decontam_ngram", "min_words"))
        if not 0 < self.minhash_threshold < 1:
            p.append(f"minhash_threshold={self.minhash_threshold}; expected a value in (0, 1)")
        if self.minhash_perm < 16:
            p.append(f"minhash_perm={self.minhash_perm}; use at least 16 permutations")
        if self.max_words < self.min_words or self.max_mean_word_length < self.min_mean_word_length:
            p.append("a quality maximum is below its minimum (min_words/max_words or the mean word lengths)")
        for name in ("max_symbol_word_ratio", "max_bullet_lines", "max_ellipsis_lines", "min_alpha_words",
                     "max_dup_line_fraction", "max_dup_line_chars"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"{name}={getattr(self, name)}; expected a value in [0, 1]")
        for name in ("top_ngram_chars", "dup_ngram_chars"):
            try:
                from lifecycle.data.prep.text import parse_ngram_thresholds

                parse_ngram_thresholds(getattr(self, name))
            except ValueError:
                p.append(f"{name}={getattr(self, name)!r}; expected n:fraction pairs such as 2:0.20,3:0.18")
        if self.min_stop_words < 0 or self.decontam_min_words < 1 or self.target_tokens < 0:
            p.append("min_stop_words and target_tokens must be >= 0, decontam_min_words >= 1")
        return p


# ---------------------------------------------------------------------------
# `llm estimate-memory` (the arithmetic is lifecycle/memory.py; it checks the values)
# ---------------------------------------------------------------------------
@dataclass
class EstimateMemoryConfig:
    """`llm estimate-memory`: predict per-GPU training memory: weights, grads, optimizer state, activations, logits, overhead.

    --lora-r is the fine-tuning stages' own option (default included), so `--method lora`
    estimates the adapters that `llm sft --lora` trains.
    """

    model: str = opt(..., "An artifact directory, a transformers config.json, or a published preset such as llama-2-7b (an unknown name lists them all).")
    stage: str = opt("sft", "pretrain | sft | reward | ppo | dpo | grpo | inference (dpo: policy + frozen reference; grpo: + a reward model).")
    method: str = opt("full", "full | lora | qlora (NF4 with double quantization).")
    lora_r: int = shared(PeftCommon, "lora_r")
    dtype: str = opt("bf16", "bf16 | fp16 | fp32.")
    precision: Optional[str] = opt(None, "mixed (default for 16-bit: fp32 master weights, 16-bit compute) | pure (16-bit weights and optimizer states).")
    mp_style: Optional[str] = opt(None, "How mixed precision keeps weights: autocast (fp32 weights and grads + 16-bit copies; default without ZeRO) | master (16-bit weights and grads + fp32 master copy, as DeepSpeed; default with ZeRO).")
    optimizer: str = opt("adamw", "adamw | adamw8bit | paged_adamw8bit | sgd (momentum) | adafactor.")
    batch_size: int = opt(1, "Micro-batch per GPU (sequences; reward: pairs).")
    seq_len: Optional[int] = opt(None, "Tokens per sequence (default: 2048 or the model's context if shorter).")
    grad_ckpt: str = opt("none", "none | full (checkpoint every decoder layer).")
    attn: str = opt("sdpa", "sdpa (flash / memory-efficient: no s x s matrices kept) | eager.")
    zero: int = opt(0, "DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights, over --gpus.")
    gpus: int = opt(1, "Data-parallel GPUs.")
    gpu_memory: Optional[str] = opt(None, "Memory per GPU (80GiB, 24GB, ...): adds a verdict and the largest micro-batch that fits.")
    device: str = opt("cuda", "cuda | cpu: whose kernel rules to apply (dropout masks, SDPA fallbacks) and whether to add the CUDA context.")
    as_json: bool = opt(False, "Print the estimate as JSON.", flag="--json")
    measure: bool = opt(False, "Also build the model, run one real training step on this machine and print estimated vs measured per row.")


@dataclass
class EvalConfig(_Checked):
    """`llm eval`: evaluate a model artifact, alone or against its parent, or every stage of a `llm run` directory."""

    model: str = opt("", "Causal-LM artifact (a model directory, or one holding a LoRA adapter) to evaluate.")
    vs: str = opt("", "A second causal LM (usually the parent) to compare with: its own metrics beside the model's and the win rate on held-out prompts.")
    reward: str = opt("", "Reward-model artifact that judges the win rate (--vs) and scores answers; the gold win rate needs none.")
    lifecycle: str = opt("", "A `llm run` directory: evaluate every causal-LM stage in it on the same items (instead of --model).")
    out: str = opt("", "Output directory: eval.json, report.md, plots/ and samples.jsonl (required).")
    data: list = opt([], "Held-out text files for bits per byte and perplexity (repeatable); empty: the built-in world's held-out documents.")
    text_column: str = opt("text", "Column holding the text in jsonl/json/csv/parquet --data files.")
    prompts: str = opt("", "Prompt file for the win rate (.jsonl/.json/.csv/.parquet/.txt, every row); empty: the held-out prompts of the models' PPO recipes, else the built-in world's held-out problems.")
    prompt_column: str = opt("prompt", "Column holding the prompt in --prompts files.")
    tasks: list = opt([], "lm-evaluation-harness tasks (repeatable or comma-separated); hub tasks need the network for their datasets.")
    task_dir: str = opt("", "A directory of lm-evaluation-harness task YAML files (local tasks, e.g. over your own JSONL).")
    num_fewshot: int = opt(-1, "Few-shot examples per lm-eval task (-1: the task's own default; 0: zero-shot).")
    limit: int = opt(0, "Evaluate only the first N items of each lm-eval task (0: all).")
    docs: int = opt(500, "Built-in world: held-out documents for bits per byte (when no --data).")
    problems: int = opt(500, "Built-in world: held-out problems for gold accuracy and the win rate (at most 500).")
    max_new_tokens: int = opt(0, "Answer tokens at most; 0: 6 on the built-in world's problems, 64 on a prompt file.")
    temperature: float = opt(0.0, "Sampling temperature of the answers (0: greedy).")
    seq_len: int = opt(0, "Tokens per window for bits per byte (0: the model's context length, at most 2048).")
    batch_size: int = opt(32, "Sequences per forward pass.")
    seed: int = opt(0, "Seed for sampled answers and the bootstrap interval.")
    world: bool = opt(True, "Also report gold accuracy on the built-in world's held-out problems.")
    decontaminate: bool = opt(True, "Report the share of evaluation items whose 13-grams occur in the training data the manifests name.")
    verify: bool = opt(False, "Check every evaluated artifact's files (and the reward model's) against the sha256 its manifest records before loading (sizes are always checked).")

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.out:
            p.append("--out is required (the directory eval.json and report.md are written to)")
        if bool(self.model) == bool(self.lifecycle):
            p.append("give --model DIR (one artifact) or --lifecycle DIR (a `llm run` directory), exactly one")
        if self.lifecycle and self.vs:
            p.append("--vs compares two models; with --lifecycle each stage is compared with its parent already")
        if self.vs and not self.model:
            p.append("--vs needs --model")
        if self.num_fewshot < -1:
            p.append(f"--num-fewshot {self.num_fewshot}; must be -1 (task default) or >= 0")
        if self.temperature < 0:
            p.append(f"--temperature {self.temperature}; must be >= 0")
        if not 1 <= self.problems <= 500:
            p.append(f"--problems {self.problems}; must lie in 1..500 (the built-in world holds out 500)")
        for name in ("docs", "batch_size"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} {getattr(self, name)}; must be at least 1")
        for name in ("limit", "seq_len", "max_new_tokens"):
            if getattr(self, name) < 0:
                p.append(f"--{name.replace('_', '-')} {getattr(self, name)}; must be >= 0")
        if self.seq_len == 1:
            p.append("--seq-len 1 leaves no token to predict; use 0 (the model's context) or at least 2")
        return p


@dataclass
class RunConfig(_Checked):
    """`llm run`: run the lifecycle stages of a recipe in order, each output handed to the next, then evaluate every stage on the same items."""

    recipe: Optional[str] = opt(None, "A lifecycle recipe (YAML or a directory with run.yaml); default: the built-in world.", argument=True)
    out: str = opt("runs/default", "Run directory: each stage writes OUT/<stage>.")
    max_steps: Optional[int] = opt(None, "Cap every stage at N optimizer steps (quick smoke runs).")
    seed: Optional[int] = opt(None, "Seed for every stage.")
    force: bool = opt(False, "Re-run stages even if their output already exists.")
    from_manifest: Optional[str] = opt(None, "Repeat a finished run (an artifact or a run directory) from its recorded configs and seeds.")
    evaluate: bool = opt(True, "After the last stage, evaluate every stage on the same held-out items (`llm eval --lifecycle OUT`, with the recipe's `eval:` options) into OUT/eval and report.md.")
    regression_margin: float = opt(0.05, "Stop after a stage whose held-out gold accuracy falls more than this (0.05 = 5 points) below its parent's, as its manifest records both; negative: never stop.")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps {self.max_steps}; must be at least 1")
        if self.seed is not None and self.seed < 0:
            p.append(f"--seed {self.seed}; must be >= 0")
        if self.regression_margin != self.regression_margin:  # NaN
            p.append("--regression-margin nan; give a number (negative: never stop)")
        return p


STAGE_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig,
                                 "dpo": DPOConfig, "grpo": GRPOConfig}


# ---------------------------------------------------------------------------
# `llm sweep` (the search is lifecycle/sweep.py; the space is a YAML file of its own, see docs/sweep.md)
# ---------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """`llm sweep`: run one stage many times under Optuna (TPE, random or grid), pruning bad trials early; each trial is a normal artifact."""

    stage: str = opt(..., "The stage each trial runs: pretrain | sft | reward | ppo | dpo | grpo.", argument=True)
    space: str = opt("", "Search space YAML (required): the options to search, the objective metric and its direction (docs/sweep.md).")
    out: str = opt("", "Sweep directory (required): OUT/trial-N per trial, OUT/sweep.md, OUT/best.yaml, OUT/plots, OUT/study.db.")
    recipe: str = opt("", "Stage recipe YAML every trial starts from; the space's values override it.", flag="--config")
    trials: int = opt(0, "Trials in the study, finished ones included (a rerun adds the missing ones); 0: the space file's `trials`, else 20.")
    sampler: str = opt("", "tpe | random | grid; empty: the space file's `sampler`, else tpe.")
    pruner: str = opt("", "median | halving | none: stop trials whose periodic held-out metric lags; empty: the space file's, else median.")
    storage: str = opt("", "Optuna storage URL shared by every worker (default sqlite:///OUT/study.db); several machines may point at one database.")
    study: str = opt("", "Study name in the storage (default: sweep-<stage>).")
    workers: int = opt(1, "Processes on this machine, each running trials of the one study.")
    gpu_memory: Optional[str] = opt(None, "Memory per GPU (80GiB, 24GB, ...): a trial whose memory estimate exceeds it is pruned before it loads a model (default: the CUDA device's memory; none on CPU).")
    seed: int = opt(0, "Seed of the sampler (a trial's own seed is the stage's `seed` option).")

    def validate(self) -> list[str]:
        p = []
        if self.stage not in STAGE_CONFIGS:
            p.append(f"stage {self.stage!r} cannot be swept; expected one of {', '.join(STAGE_CONFIGS)}")
        if not self.space:
            p.append("--space is required (a search-space YAML such as recipes/default/sweep-pretrain.yaml)")
        if not self.out:
            p.append("--out is required (the sweep directory)")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            p.append(f"--out {self.out} is a file; give a directory path")
        if self.trials < 0:
            p.append(f"trials={self.trials}; must be >= 0 (0: the space file's)")
        if self.sampler not in ("", "tpe", "random", "grid"):
            p.append(f"sampler={self.sampler!r}; expected tpe, random or grid")
        if self.pruner not in ("", "median", "halving", "none"):
            p.append(f"pruner={self.pruner!r}; expected median, halving or none")
        if self.workers < 1:
            p.append(f"workers={self.workers}; must be at least 1")
        return p
