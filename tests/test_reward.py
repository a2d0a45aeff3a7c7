"""`llm reward` and reward scoring: short runs on the tiny fixtures, the artifact, padding, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.config import RewardConfig, build_config
from tests.test_sft import BASE_PARAMS, DORA_EXTRA, EXAMPLES, LORA_PARAMS, assert_usage_error, manifest, run_cli

HEAD_PARAMS = 32  # the one-output score head on hidden 32 (no bias), trained in full next to the adapters


def rm_cfg(base, out, **kw):
    values = dict(base=str(base), out=str(out), max_steps=2, world_prompts=24, eval_problems=8, batch_size=8,
                  eval_batch_size=16, warmup_steps=0, save_every=0, log_every=1, eval_every=100, lr=1e-3)
    values.update(kw)
    return build_config(RewardConfig, None, values)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A small user preference file: the example pairs plus a few built-in world pairs."""
    from lifecycle.data import world

    rows = [json.loads(line) for line in (EXAMPLES / "preferences.jsonl").read_text().splitlines()]
    rows += world.preference_pairs(world.reward_problems(12, seed=3))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, tiny_base, pairs_file):
    from lifecycle.stages import reward

    cache: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"rm_{mode}")
            if mode == "full":  # the built-in world: pairs from the base's own samples
                cfg = rm_cfg(tiny_base, out)
            else:
                cfg = rm_cfg(tiny_base, out, data=[str(pairs_file)], eval_fraction=0.25, **{mode: True})
            cache[mode] = reward.run(cfg)
        return cache[mode]

    return get


def test_full_reward_model_is_a_stock_one_label_classifier(rm_run, tiny_base):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = rm_run("full")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "lifecycle.json", "log.jsonl"} <= files
    m = manifest(out)
    assert m["stage"] == "reward" and m["kind"] == "reward-model"
    assert m["parent"]["path"] == str(Path(tiny_base).resolve())
    for key in ("eval_accuracy", "eval_margin", "eval_accuracy_initial", "train_pairs"):
        assert key in m["metrics"], key
    assert m["metrics"]["train_pairs"] == 24 and m["metrics"]["eval_pairs"] == 8
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    assert model.config.pad_token_id is not None
    before, after = load_file(Path(tiny_base) / "model.safetensors"), load_file(out / "model.safetensors")
    shared = [k for k in after if k in before]
    assert shared and any(not torch.equal(before[k], after[k]) for k in shared), "backbone unchanged"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in row for row in log) and all("step" in row for row in log)


def test_reward_model_learns_the_preference(tiny_base, tmp_path):
    """Pairs whose chosen answer is always "no" and rejected "yes" (after varied prompts), a preference the untrained
    model gets backwards: a few steps later every held-out pair is ordered right and the mean margin
    r(chosen) - r(rejected) has grown well past its start."""
    from lifecycle.stages import reward

    data = tmp_path / "yes_no.jsonl"
    rows = [{"prompt": f"is {a} plus {b} a number ?", "chosen": "no", "rejected": "yes"} for a in range(8) for b in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = reward.run(rm_cfg(tiny_base, tmp_path / "o", data=[str(data)], eval_fraction=0.25, max_steps=8, lr=1e-2))
    m = manifest(out)["metrics"]
    assert m["eval_pairs"] == 10
    assert m["eval_accuracy_initial"] == 0.0 and m["eval_accuracy"] == 1.0
    assert m["eval_margin"] > m["eval_margin_initial"] + 1.0, (m["eval_margin_initial"], m["eval_margin"])


@pytest.mark.parametrize("mode", ["lora", "qlora", "dora"])
def test_reward_adapters_count_and_load_in_stock_peft(rm_run, tiny_base, tiny_tokenizer, mode):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = rm_run(mode)
    m = manifest(out)["metrics"]
    lora = LORA_PARAMS + (DORA_EXTRA if mode == "dora" else 0)
    assert m["trainable_params"] == lora + HEAD_PARAMS
    # The classifier has the base's parameters plus its head; peft keeps the original head next to the trained copy.
    assert m["total_params"] == BASE_PARAMS + HEAD_PARAMS + lora + HEAD_PARAMS
    assert "eval_accuracy" in m

    ids = tiny_tokenizer(["<|user|> what is 1 plus 2 ?<|assistant|> 3<|endoftext|>"], return_tensors="pt")["input_ids"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    stock = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-4)


def test_score_is_the_same_for_left_and_right_padding(rm_run, tiny_tokenizer):
    import torch

    from lifecycle.reward_model import encode, load_reward_model, score

    model = load_reward_model(str(rm_run("full")))
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "what is 1 plus 2 ?"}], tokenize=False,
                                                  add_generation_prompt=True)
    prompts = [[{"role": "user", "content": "what is 48 plus 87 ?"}], rendered, ""]
    responses = [" 135", " 3", "a longer plain text response without a prompt"]  # generated text keeps its space
    right = score(model, tiny_tokenizer, prompts, responses)
    tiny_tokenizer.padding_side = "left"
    try:
        left = score(model, tiny_tokenizer, prompts, responses)
    finally:
        tiny_tokenizer.padding_side = "right"
    # One at a time (no padding at all) through the stock forward, which reads the last token.
    seqs, _ = encode(tiny_tokenizer, prompts, responses)
    with torch.no_grad():
        alone = [model(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert right == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    # The rendered-string prompt and the chat-message prompt give the same ids.
    chat, _ = encode(tiny_tokenizer, [[{"role": "user", "content": "what is 1 plus 2 ?"}]], ["3"])
    assert chat[0] == seqs[1]


def test_pairwise_accuracy_counts_chosen_above_rejected():
    from lifecycle import reward_model

    class Fake:
        pass

    scores = iter([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    orig = reward_model.score
    reward_model.score = lambda *a, **k: next(scores)
    try:
        r = reward_model.pairwise_accuracy(Fake(), None, [{"chosen": "a", "rejected": "b"}] * 3)
    finally:
        reward_model.score = orig
    assert r["accuracy"] == pytest.approx(2 / 3) and r["margin"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------
# Bad input through the CLI
# ---------------------------------------------------------------------------
def test_cli_reward_refuses_data_without_preference_columns(tiny_base, tmp_path):
    proc = run_cli("reward", "--base", str(tiny_base), "--out", str(tmp_path / "o"),
                   "--data", str(EXAMPLES / "sft_prompt_completion.jsonl"))
    assert_usage_error(proc, "columns completion, prompt", "missing 'chosen' and 'rejected'")


def test_cli_reward_refuses_identical_pairs(tiny_base, tmp_path):
    data = tmp_path / "same.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c", "rejected": "c"}\n')
    proc = run_cli("reward", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--data", str(data))
    assert_usage_error(proc, "1 pair(s) have identical", "row 2")


def test_cli_reward_refuses_a_reward_model_as_base(rm_run, tmp_path):
    proc = run_cli("reward", "--base", str(rm_run("full")), "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "reward-model artifact", "causal-lm is expected")


def test_default_recipe_restates_the_builtin_defaults():
    from lifecycle.config import read_yaml

    defaults = RewardConfig()
    for k, v in read_yaml(Path(__file__).resolve().parent.parent / "recipes/default/reward.yaml").items():
        assert getattr(defaults, k) == v, k
