"""The parts of `llm eval` (lifecycle/eval.py) that need no model in hand: lm-eval, decontamination, the report."""
