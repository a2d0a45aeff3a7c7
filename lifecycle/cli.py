"""The `llm` command line: parse flags, build the stage's config, call the stage.

This is the only place that turns errors into exit codes: a `UsageError` (or a
bad flag) prints one `error: ...` line and exits 2, with no traceback. torch
and friends are imported inside the commands, so `llm --help` answers at once.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from lifecycle.config import PretrainConfig, build_config, describe, dump_yaml, parse_set
from lifecycle.config import RewardConfig, SFTConfig
from lifecycle.config import PPOConfig
from lifecycle.errors import Interrupted, TrainingDiverged, UsageError

app = typer.Typer(
    help="Train a language model through its whole life: pretrain, sft, reward, ppo; estimate memory first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

CONFIG_HELP = "Recipe YAML that fills the config (flags override it), e.g. recipes/default/pretrain.yaml."
SET_HELP = "Override any config option: --set key=value (repeatable). The options are listed below."


def _overrides(set_: Optional[List[str]], **flags) -> dict:
    """Flags the user gave (not None/False) plus --set pairs; explicit flags win over --set."""
    out = parse_set(set_)
    for k, v in flags.items():
        if v is None or v is False or v == []:
            continue
        out[k] = v
    return out


def _run_stage(cls: type, module: str, config: Optional[str], overrides: dict, print_config: bool) -> None:
    cfg = build_config(cls, config, overrides, check=not print_config)
    if print_config:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    import importlib

    stage = importlib.import_module(f"lifecycle.stages.{module}")
    stage.run(cfg)


def _not_yet(name: str) -> None:
    raise UsageError(f"`llm {name}` is not implemented yet in this version")


# ---------------------------------------------------------------------------
@app.command(epilog="Config options (set with --set key=value or in the --config YAML):\n\n" + describe(PretrainConfig))
def pretrain(
    out: Optional[str] = typer.Option(None, "--out", help="Output artifact directory; checkpoints go to OUT/checkpoints."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Training text file(s) or a datasets hub id (repeatable); default: the built-in world."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Reuse this tokenizer instead of training one."),
    model: Optional[str] = typer.Option(None, "--model", help="Model preset name or a config.json path."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="none | tensorboard | wandb."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a decoder-only model and its tokenizer from scratch."""
    ov = _overrides(set_, out=out, data=data, tokenizer=tokenizer, model=model, max_steps=max_steps,
                    save_every=save_every, resume=resume, seed=seed, report_to=report_to, force=force)
    _run_stage(PretrainConfig, "pretrain", config, ov, print_config)


LORA_HELP = "Train LoRA adapters (rank lora_r on every linear layer by default) instead of all weights."
QLORA_HELP = "QLoRA: LoRA adapters on a 4-bit NF4 copy of the base (bitsandbytes; works on CPU too)."
DORA_HELP = "DoRA: weight-decomposed LoRA (implies --lora unless --qlora)."
NO_MERGE_HELP = "Keep only the adapter (OUT/adapter); by default OUT also holds it merged into a plain model."


@app.command(epilog="Config options (set with --set key=value or in the --config YAML):\n\n" + describe(SFTConfig))
def sft(
    base: Optional[str] = typer.Option(None, "--base", help="Causal-LM artifact to fine-tune (`llm pretrain` output) or a hub model id."),
    out: Optional[str] = typer.Option(None, "--out", help="Output artifact directory; checkpoints go to OUT/checkpoints."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Instruction data file(s) or a datasets hub id (repeatable; see docs/data.md); default: the built-in world."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML that fills the config (flags override it), e.g. recipes/default/sft.yaml."),
    lora: bool = typer.Option(False, "--lora", help=LORA_HELP),
    qlora: bool = typer.Option(False, "--qlora", help=QLORA_HELP),
    dora: bool = typer.Option(False, "--dora", help=DORA_HELP),
    no_merge: bool = typer.Option(False, "--no-merge", help=NO_MERGE_HELP),
    packing: bool = typer.Option(False, "--packing", help="Pack several examples into each max_length block."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="none | tensorboard | wandb."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Supervised fine-tuning on instructions (full, --lora, --qlora, --dora)."""
    ov = _overrides(set_, base=base, out=out, data=data, lora=lora, qlora=qlora, dora=dora, packing=packing,
                    max_steps=max_steps, save_every=save_every, resume=resume, seed=seed, report_to=report_to)
    if no_merge:
        ov["merge"] = False
    _run_stage(SFTConfig, "sft", config, ov, print_config)


@app.command(epilog="Config options (set with --set key=value or in the --config YAML):\n\n" + describe(RewardConfig))
def reward(
    base: Optional[str] = typer.Option(None, "--base", help="Causal-LM artifact (usually the `llm sft` output) or hub id; on the built-in world its samples make the pairs."),
    out: Optional[str] = typer.Option(None, "--out", help="Output artifact directory; checkpoints go to OUT/checkpoints."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Preference data file(s) or a datasets hub id with chosen/rejected (see docs/data.md); default: the built-in world."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start the reward model's backbone from this causal LM instead of --base."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML that fills the config (flags override it), e.g. recipes/default/reward.yaml."),
    lora: bool = typer.Option(False, "--lora", help=LORA_HELP),
    qlora: bool = typer.Option(False, "--qlora", help=QLORA_HELP),
    dora: bool = typer.Option(False, "--dora", help=DORA_HELP),
    no_merge: bool = typer.Option(False, "--no-merge", help=NO_MERGE_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="none | tensorboard | wandb."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a reward model on preference pairs (full, --lora, --qlora, --dora)."""
    ov = _overrides(set_, base=base, out=out, data=data, init_from=init_from, lora=lora, qlora=qlora, dora=dora,
                    max_steps=max_steps, save_every=save_every, resume=resume, seed=seed, report_to=report_to)
    if no_merge:
        ov["merge"] = False
    _run_stage(RewardConfig, "reward", config, ov, print_config)


@app.command(epilog="Config options (set with --set key=value or in the --config YAML):\n\n" + describe(PPOConfig))
def ppo(
    policy: Optional[str] = typer.Option(None, "--policy", help="The SFT policy (causal-LM artifact or hub id): the actor starts from it and it is the frozen reference."),
    reward: Optional[str] = typer.Option(None, "--reward", help="The reward model (`llm reward` output: a one-label sequence classifier); frozen."),
    out: Optional[str] = typer.Option(None, "--out", help="Output artifact directory; checkpoints go to OUT/checkpoints, the critic to OUT/critic."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML that fills the config (flags override it), e.g. recipes/default/ppo.yaml."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompt file or datasets hub id; default: the built-in world's problems."),
    lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter on the actor; the reference is the actor with the adapter disabled."),
    qlora: bool = typer.Option(False, "--qlora", help="As --lora, on a 4-bit NF4 copy of the policy."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N PPO iterations (rollout batch + its epochs)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N iterations."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT/checkpoints."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    strict: bool = typer.Option(False, "--strict", help="Refuse to start when the reward-model quality gate fails."),
    stop_on_collapse: bool = typer.Option(False, "--stop-on-collapse", help="Save a checkpoint and stop when the watchdog raises an alarm."),
    explain: bool = typer.Option(False, "--explain", help="Print the batch hierarchy and memory estimate, then exit."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="none | tensorboard | wandb."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """RLHF with PPO against a reward model (actor, frozen reference, frozen reward model, critic)."""
    ov = _overrides(set_, policy=policy, reward=reward, out=out, prompts=prompts, lora=lora, qlora=qlora,
                    max_steps=max_steps, save_every=save_every, resume=resume, seed=seed, strict=strict,
                    stop_on_collapse=stop_on_collapse, explain=explain, report_to=report_to, force=force)
    _run_stage(PPOConfig, "ppo", config, ov, print_config)


@app.command("estimate-memory")
def estimate_memory(
    model: str = typer.Option(..., "--model", help="An artifact directory, a config.json, or a preset: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, mistral-7b, qwen2.5-0.5b, qwen2.5-7b, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or the project's own (llama-tiny, ...)."),
    stage: str = typer.Option("sft", "--stage", help="pretrain | sft | reward | ppo | inference."),
    method: str = typer.Option("full", "--method", help="full | lora | qlora (NF4 with double quantization)."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank (adapters on every linear layer of the blocks)."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | fp16 | fp32."),
    precision: Optional[str] = typer.Option(None, "--precision", help="mixed (default for 16-bit: fp32 master weights, 16-bit compute) | pure (16-bit weights and optimizer states)."),
    mp_style: Optional[str] = typer.Option(None, "--mp-style", help="How mixed precision keeps weights: autocast (fp32 weights and grads + 16-bit copies; default without ZeRO) | master (16-bit weights and grads + fp32 master copy, as DeepSpeed; default with ZeRO)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adamw8bit | paged_adamw8bit | sgd (momentum) | adafactor."),
    batch_size: int = typer.Option(1, "--batch-size", help="Micro-batch per GPU (sequences; reward: pairs)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: 2048 or the model's context if shorter)."),
    grad_ckpt: str = typer.Option("none", "--grad-ckpt", help="none | full (checkpoint every decoder layer)."),
    attn: str = typer.Option("sdpa", "--attn", help="sdpa (flash / memory-efficient: no s x s matrices kept) | eager."),
    zero: int = typer.Option(0, "--zero", help="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights, over --gpus."),
    gpus: int = typer.Option(1, "--gpus", help="Data-parallel GPUs."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU (80GiB, 24GB, ...): adds a verdict and the largest micro-batch that fits."),
    device: str = typer.Option("cuda", "--device", help="cuda | cpu: whose kernel rules to apply (dropout masks, SDPA fallbacks) and whether to add the CUDA context."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
    measure: bool = typer.Option(False, "--measure", help="Also build the model, run one real training step on this machine and print estimated vs measured per row."),
) -> None:
    """Predict per-GPU training memory: weights, grads, optimizer state, activations, logits, overhead."""
    from lifecycle.memory import cli_estimate

    cli_estimate(model=model, stage=stage, method=method, lora_r=lora_r, dtype=dtype, precision=precision,
                 mp_style=mp_style, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt,
                 attn=attn, zero=zero, gpus=gpus, gpu_memory=gpu_memory, device=device, as_json=as_json,
                 measure=measure, echo=typer.echo)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text (in --chat mode, the user's message)."),
    model: str = typer.Option(..., "--model", help="A causal-LM artifact directory or hub id."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 means greedy decoding."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set with this much probability (1: off)."),
    num: int = typer.Option(1, "--num", help="Number of samples."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt with the tokenizer's chat template."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
) -> None:
    """Generate text from a model artifact."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens {max_new_tokens}; must be at least 1")
    if temperature < 0:
        problems.append(f"--temperature {temperature}; must be >= 0")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}; must lie in (0, 1]")
    if top_k < 0 or num < 1:
        problems.append("--top-k must be >= 0 and --num >= 1")
    if problems:
        raise UsageError("; ".join(problems))
    from lifecycle.generate import generate_cli

    generate_cli(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, num=num, chat=chat, seed=seed)


@app.command()
def run(
    recipe: Optional[str] = typer.Argument(None, help="A lifecycle recipe (YAML or a directory with run.yaml); default: the built-in world."),
    out: str = typer.Option("runs/default", "--out", help="Run directory: each stage writes OUT/<stage>."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap every stage at N optimizer steps (quick smoke runs)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for every stage."),
    force: bool = typer.Option(False, "--force", help="Re-run stages even if their output already exists."),
    from_manifest: Optional[str] = typer.Option(None, "--from-manifest", help="Repeat a finished run (an artifact or a run directory) from its recorded configs and seeds."),
) -> None:
    """Run the lifecycle stages of a recipe in order, each output handed to the next."""
    from lifecycle.runner import run_lifecycle

    run_lifecycle(recipe, out, max_steps=max_steps, seed=seed, force=force, from_manifest=from_manifest)


# ---------------------------------------------------------------------------
def main() -> None:
    try:
        app()
    except UsageError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(3)
    except Interrupted as e:
        typer.echo(f"stopped: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
