"""How a config dataclass is declared, filled and checked: the machinery behind lifecycle/config.py.

Declaring: `opt(default, help)` is a field with its help text; `shared(Group, name, default)` restates a
group's field with another default; `_Checked` ends every group's `validate` chain.

Filling: `build_config(cls, recipe, overrides)` takes the dataclass defaults, then the recipe YAML
(`read_yaml`, safe loading), then the command line's values, coerces each to its field's type (`_coerce`:
`3e-4` read by PyYAML as a string is a float, `a, b` is a list) and reports every problem of every source in
one line, then runs `validate` (`check_config`). `dump_yaml` writes a resolved config back as commented YAML
(`--print-config`), `parse_set` reads `--set key=value` pairs.

No torch here: `llm --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from lifecycle.errors import UsageError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by `llm <stage> --help` and `--print-config`).

    `default=...` (Ellipsis) makes the field required. Extra keywords go into the
    field's metadata; `flag="--name"` gives the command-line flag another name.
    """
    if default is ...:
        return field(metadata={"help": help, **kw})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_SAME = object()


def shared(group: type, name: str, default: Any = _SAME) -> Any:
    """`group`'s field `name`, declared again in another config with its help (and, unless given, its default).

    A stage uses it to give a shared option its own default without writing the
    help a second time.
    """
    f = group.__dataclass_fields__[name]
    if default is _SAME:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return opt(default, **f.metadata)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh copy for lists); `...` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ...


class _Checked:
    """The end of every group's `validate` chain."""

    def validate(self) -> list[str]:
        """Every problem with these options, one line each (empty when they are fine)."""
        # Every number must be finite: a NaN passes every range check (all comparisons are false) and
        # would train a model of NaNs; infinity is never a sensible setting either.
        return [f"{f.name}={getattr(self, f.name)}; must be a finite number" for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]


def _at_least_one(cfg: Any, names: tuple[str, ...]) -> list[str]:
    return [f"{n}={getattr(cfg, n)}; must be at least 1" for n in names if getattr(cfg, n) < 1]


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
            if Path(value).exists():  # a path with a comma in its name is one path
                return [value]
            return [v.strip() for v in value.split(",") if v.strip()]  # `a, b`: two items, no leading space
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
