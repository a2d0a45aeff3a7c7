"""The parts of `llm eval` (lifecycle/eval.py) beside the measurements: lm-eval, decontamination, the report,
and `Loaded`, the model under evaluation that they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Loaded:
    name: str  # what the report calls it
    path: str
    model: Any
    tokenizer: Any
    manifest: dict | None
    adapter: str | None = None  # the adapter directory when the model is base + LoRA
