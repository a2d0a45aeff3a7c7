"""The `llm` command line: parse flags, build the stage's config, call the stage.

The commands of the stages and of `estimate-memory` are built from the config
dataclasses in `lifecycle/config.py`: every field becomes a flag with the
field's name, type, default and help (`lr` -> `--lr`, `save_every` ->
`--save-every`, a bool `merge` -> `--merge/--no-merge`), so an option is
described once, and a field shared by several stages is one flag definition.
Only flags given on the command line override the recipe: defaults <- --config
YAML <- --set key=value <- flags.

This is the only place that turns errors into exit codes: a `UsageError` (or a
bad flag) prints one `error: ...` line and exits 2, with no traceback. torch
and friends are imported inside the commands, so `llm --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from typing import Any, Callable, List, Optional

import typer

from lifecycle.config import (STAGE_CONFIGS, DataConfig, EstimateMemoryConfig, EvalConfig, RunConfig, build_config, dump_yaml,
                              field_default, field_types, parse_set)
from lifecycle.errors import Interrupted, StageRegressed, TrainingDiverged, UsageError

app = typer.Typer(
    help="Train a language model through its whole life: data, pretrain, sft, reward, ppo | grpo | dpo, eval, sweep; estimate memory first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# The options every stage command has besides its config's fields.
RECIPE_OPTIONS = {
    "config": (Optional[str], typer.Option(
        None, "--config", help="Recipe YAML that fills the config (flags override it), e.g. recipes/default/sft.yaml.")),
    "set_": (Optional[List[str]], typer.Option(
        None, "--set", help="Override any config option: --set key=value (repeatable); flags win over --set.")),
    "print_config": (bool, typer.Option(False, "--print-config", help="Print the resolved config and exit.")),
}


# ---------------------------------------------------------------------------
# Flags from config fields
# ---------------------------------------------------------------------------
def flag_name(f: dataclasses.Field) -> str:
    """`--save-every` for `save_every`, or the field's own `flag` metadata (`as_json` -> `--json`)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@functools.cache
def field_option(f: dataclasses.Field, typ: Any) -> Any:
    """The flag of one config field: its name, default and help are the field's.

    Cached per field, so a field that several configs inherit from one group
    (PeftCommon.lora_r in sft, reward and ppo) is one flag definition.
    """
    if f.metadata.get("argument"):  # a positional argument (`llm sweep STAGE`)
        return typer.Argument(field_default(f), help=f.metadata.get("help", ""), show_default=False)
    name = flag_name(f)
    names = [f"{name}/--no-{name[2:]}"] if typ is bool else [name]
    return typer.Option(field_default(f), *names, help=f.metadata.get("help", ""))


def _annotation(typ: Any) -> Any:
    return List[str] if typ is list else typ


def config_command(cls: type, action: Callable[[Any], None], *, recipe: bool) -> Callable[..., None]:
    """A Typer command whose flags are `cls`'s fields; it builds the config and hands it to `action`.

    With `recipe`, the command also takes --config, --set and --print-config,
    and a flag overrides only when it was given on the command line (its
    default shows the dataclass default, but must not overwrite the YAML).
    """
    types = field_types(cls)
    assert not set(types) & (set(RECIPE_OPTIONS) | {"ctx"}), f"{cls.__name__} has a field named like a CLI option"
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ctx", kw, annotation=typer.Context)]
    params += [inspect.Parameter(f.name, kw, annotation=_annotation(types[f.name]), default=field_option(f, types[f.name]))
               for f in dataclasses.fields(cls)]
    if recipe:
        params += [inspect.Parameter(n, kw, annotation=a, default=o) for n, (a, o) in RECIPE_OPTIONS.items()]

    def command(ctx: typer.Context, **values: Any) -> None:
        if not recipe:
            action(cls(**{k: values[k] for k in types}))
            return
        flags = {k: v for k, v in values.items() if k in types and _given(ctx, k)}
        cfg = build_config(cls, values["config"], {**parse_set(values["set_"]), **flags}, check=not values["print_config"])
        if values["print_config"]:
            typer.echo(dump_yaml(cfg), nl=False)
        else:
            action(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = summary(cls)
    return command


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed this flag (not its default showing through)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def summary(cls: type) -> str:
    """The command's help: the config's docstring without its "`llm x`: " prefix."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc.startswith("`llm ") and "`: " in doc:
        doc = doc.split("`: ", 1)[1]
    return doc[:1].upper() + doc[1:]


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------
def run_stage(name: str, cfg: Any) -> None:
    """Import the stage (torch from here on) and run it; `llm ppo --explain` only explains."""
    stage = importlib.import_module(f"lifecycle.stages.{name}")
    if getattr(cfg, "explain", False):  # ppo: print the batch hierarchy and the four roles' memory; train nothing
        stage.explain(cfg)
    else:
        stage.run(cfg)


for _name, _cls in STAGE_CONFIGS.items():
    app.command(_name)(config_command(_cls, functools.partial(run_stage, _name), recipe=True))
app.command("data")(config_command(DataConfig, functools.partial(run_stage, "data"), recipe=True))


def evaluate(cfg: EvalConfig) -> None:
    """`llm eval` (torch from here on)."""
    from lifecycle.eval import run as run_eval

    run_eval(cfg)


app.command("eval")(config_command(EvalConfig, evaluate, recipe=True))


def estimate_memory(cfg: EstimateMemoryConfig) -> None:
    """The estimate (no torch), or with --measure one real training step beside it."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "measure"}
    if cfg.measure:
        from lifecycle import memory_measure  # torch from here on

        memory_measure.cli_measure(**args, echo=typer.echo)
        return
    from lifecycle.memory import cli_estimate

    cli_estimate(**args, echo=typer.echo)


app.command("estimate-memory")(config_command(EstimateMemoryConfig, estimate_memory, recipe=False))


def sweep(cfg: Any) -> None:
    """`llm sweep STAGE --space SPACE.yaml --out DIR` (Optuna, and torch in the trials, from here on)."""
    from lifecycle.sweep import run as run_sweep

    run_sweep(cfg)


from lifecycle.config import SweepConfig  # noqa: E402  (beside its command; the other configs are imported above)

app.command("sweep")(config_command(SweepConfig, sweep, recipe=False))


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


def run(cfg: Any) -> None:
    """`llm run` (torch from the first stage on)."""
    from lifecycle.config import check_config
    from lifecycle.runner import run_lifecycle

    check_config(cfg)
    run_lifecycle(cfg.recipe, cfg.out, max_steps=cfg.max_steps, seed=cfg.seed, force=cfg.force,
                  from_manifest=cfg.from_manifest, evaluate=cfg.evaluate, regression_margin=cfg.regression_margin)


app.command("run")(config_command(RunConfig, run, recipe=False))


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
    except StageRegressed as e:
        typer.echo(f"stopped: {e}", err=True)
        sys.exit(4)
    except Interrupted as e:
        typer.echo(f"stopped: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
