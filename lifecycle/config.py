"""One typed config per stage: the single source of defaults and help text.

A recipe YAML fills a config, command-line flags override it, and `validate`
reports every problem at once before any weights are loaded. The resolved
config is saved into the artifact's manifest.

The defaults are the built-in world's CPU-sized recipe: `llm pretrain --out DIR`
with no other flag trains the default model. `recipes/default/*.yaml` restate
them with comments; a test checks that every shipped recipe loads.

This module imports no torch, so `llm --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lifecycle.errors import UsageError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by `llm <stage> --help` and `--print-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# ---------------------------------------------------------------------------
# Shared training options
# ---------------------------------------------------------------------------
@dataclass
class TrainCommon:
    """Options every training stage shares."""

    out: str = opt("", "Output artifact directory (required).")
    seed: int = opt(0, "Random seed for data order, initialisation and sampling.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means the recipe's length.")
    save_every: int = opt(200, "Write a checkpoint every N optimizer steps (0 disables periodic checkpoints).")
    keep_checkpoints: int = opt(2, "Keep only the newest K checkpoints under OUT/checkpoints.")
    resume: bool = opt(False, "Continue from the newest checkpoint under OUT/checkpoints.")
    mixed_precision: str = opt("no", "no | bf16 | fp16: autocast precision (fp16 uses loss scaling; GPU only).")
    report_to: str = opt("none", "none | tensorboard | wandb: also send metrics to this tracker.")
    log_every: int = opt(10, "Print a progress line every N optimizer steps.")
    force: bool = opt(False, "Run even if the memory estimate says the run does not fit the device.")

    def _common_problems(self) -> list[str]:
        p = []
        if not self.out:
            p.append("--out is required (the directory the artifact is written to)")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            p.append(f"--out {self.out} is a file; give a directory path")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            p.append(f"mixed_precision={self.mixed_precision!r}; expected no, bf16 or fp16")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            p.append(f"report_to={self.report_to!r}; expected none, tensorboard or wandb")
        if self.keep_checkpoints < 1:
            p.append(f"keep_checkpoints={self.keep_checkpoints}; must be at least 1")
        if self.save_every < 0:
            p.append(f"save_every={self.save_every}; must be >= 0")
        if self.log_every < 1:
            p.append(f"log_every={self.log_every}; must be >= 1")
        return p


@dataclass
class PeftCommon:
    """Adapter options shared by sft, reward and ppo: LoRA, QLoRA (4-bit base + LoRA) and DoRA."""

    lora: bool = opt(False, "Train LoRA adapters instead of all weights.")
    qlora: bool = opt(False, "QLoRA: load the base in 4-bit NF4 (double quantization, bf16 compute) and train LoRA adapters on it.")
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output feature); implies --lora unless --qlora.")
    lora_r: int = opt(8, "LoRA rank r: the width of the low-rank update B·A.")
    lora_alpha: int = opt(16, "LoRA alpha: the update is scaled by alpha / r.")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: 'all-linear' or comma-separated names (e.g. q_proj,v_proj).")
    merge: bool = opt(True, "Also write the adapter merged into the base as a plain model at OUT (--no-merge keeps only OUT/adapter).")

    @property
    def use_peft(self) -> bool:
        return self.lora or self.qlora or self.dora

    def _peft_problems(self) -> list[str]:
        p = []
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
    # --- model ---
    model: str = opt("llama-tiny", "A preset name (see `llm pretrain --help`) or a path to a transformers config.json.")
    seq_len: int = opt(64, "Tokens per training block (documents are joined with EOS and packed).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    compile: bool = opt(False, "torch.compile the model.")
    # --- optimisation ---
    batch_size: int = opt(64, "Blocks per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimizer step.")
    steps: int = opt(1200, "Optimizer steps of the recipe (overridden by --max-steps).")
    lr: float = opt(3e-3, "Peak learning rate.")
    min_lr: float = opt(3e-4, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = opt(60, "Linear warmup steps from 0 to lr.")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only (not norms, biases).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    # --- evaluation ---
    eval_every: int = opt(200, "Evaluate held-out loss every N steps.")
    eval_batches: int = opt(16, "Micro-batches of held-out blocks per evaluation.")
    sample_prompt: str = opt("48 plus 87 equals", "Prompt for the greedy sample printed at each evaluation.")

    def validate(self) -> list[str]:
        p = self._common_problems()
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "vocab_size", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}; must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            p.append(f"max_steps={self.max_steps}; must be positive (or -1 for the recipe's length)")
        if not 0 < self.lr < 1:
            p.append(f"lr={self.lr}; expected a value in (0, 1)")
        if not 0 <= self.min_lr <= self.lr:
            p.append(f"min_lr={self.min_lr}; must lie in [0, lr]")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps={self.warmup_steps}; must be >= 0")
        if not 0 < self.eval_fraction < 1:
            p.append(f"eval_fraction={self.eval_fraction}; expected a value in (0, 1)")
        if self.vocab_size < 300 and not self.tokenizer:
            p.append(f"vocab_size={self.vocab_size}; a byte-level BPE needs at least 300 (256 bytes + specials + merges)")
        return p

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps > 0 else self.steps


STAGE_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig}


# ---------------------------------------------------------------------------
# Loading, overriding, validating
# ---------------------------------------------------------------------------
def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check/convert one value to its field type; raise ValueError with a reason."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if typ is list or origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return list(value)
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads `3e-4` as a string; accept it.
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    return value


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} not found; pass an existing recipe such as recipes/default/pretrain.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"config file {path} is not valid YAML ({first}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value, found {type(data).__name__}")
    return data


def build_config(cls: type, path: str | None = None, overrides: dict | None = None, *, check: bool = True):
    """Defaults <- recipe YAML <- overrides, type-checked; all problems reported together."""
    types = field_types(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    sources: list[tuple[str, dict]] = []
    if path:
        sources.append((f"in {path}", read_yaml(path)))
    if overrides:
        sources.append(("on the command line", overrides))
    for where, src in sources:
        unknown = sorted(k for k in src if k not in types)
        if unknown:
            problems.append(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} {where}; "
                f"valid options: {', '.join(types)}"
            )
        for k, v in src.items():
            if k in types:
                try:
                    values[k] = _coerce(k, v, types[k])
                except ValueError as e:
                    problems.append(f"{k} {where}: {e}")
    if problems:
        raise UsageError("; ".join(problems))
    cfg = cls(**values)
    if check:
        check_config(cfg)
    return cfg


def check_config(cfg: Any) -> None:
    problems = cfg.validate() if hasattr(cfg, "validate") else []
    if problems:
        raise UsageError("invalid config: " + "; ".join(problems))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as commented YAML (what `--print-config` shows)."""
    lines = [f"# {type(cfg).__name__}: {(type(cfg).__doc__ or '').strip()}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rendered = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10_000).strip()
        if rendered.startswith("{") and rendered.endswith("}"):
            rendered = rendered[1:-1]
        lines.append(f"{rendered}  # {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def describe(cls: type) -> str:
    """One line per option, for the CLI help epilog."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n\n".join(rows)


def parse_set(items: list[str] | None) -> dict:
    """`--set key=value` pairs into a dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not key=value; write for example --set lr=1e-3")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out
