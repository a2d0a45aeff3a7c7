"""llm: a language model's whole life, from pretraining to RLHF, on one command line."""

__version__ = "0.1.0"
