"""Shared fixtures: a tiny tokenizer and tiny base-model artifacts, built once per session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls only lose from intra-op threads, badly so on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lifecycle.data import world
    from lifecycle.tokenizer import train_tokenizer

    return train_tokenizer(world.pretrain_documents(300, seed=1), vocab_size=300)


def _make_base(tmp_path_factory, tokenizer, preset: str, name: str):
    import torch

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import build_model, model_config

    torch.manual_seed(0)
    cfg = model_config(preset, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = build_model(cfg)
    out = tmp_path_factory.mktemp(name)
    save_model_artifact(model, tokenizer, out, stage="pretrain", config={"model": preset}, metrics={}, parent=None, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_tokenizer):
    """A pretrain-kind artifact: an untrained 2-layer Llama (hidden 32, GQA) with the tiny tokenizer."""
    return _make_base(tmp_path_factory, tiny_tokenizer, "llama-micro", "tiny_base")


@pytest.fixture(scope="session")
def tiny_gpt2_base(tmp_path_factory, tiny_tokenizer):
    """A pretrain-kind artifact: an untrained 2-layer GPT-2 with the tiny tokenizer."""
    return _make_base(tmp_path_factory, tiny_tokenizer, "gpt2-micro", "tiny_gpt2_base")


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A ChatML tokenizer as hub models ship it: turns end with <|im_end|>, EOS is <|endoftext|>."""
    from families import chatml_tokenizer as make

    return make()


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, chatml_tokenizer):
    """family -> a hub-style directory holding a tiny random model of that family (built once per session)."""
    from families import make_family_dir

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_family_dir(tmp_path_factory.mktemp(f"hub_{family}"), family, chatml_tokenizer)
        return cache[family]

    return get
