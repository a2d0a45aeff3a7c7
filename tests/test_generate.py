"""Sampling: greedy equals stock transformers' greedy; top-k 1 is greedy; responses stop at EOS; the CLI prints."""

from __future__ import annotations

import subprocess
import sys

import torch

from lifecycle.generate import generate_batch, render_prompts


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_greedy_matches_a_hand_rolled_argmax_loop(tiny_base, tiny_tokenizer):
    model = _model(tiny_base)
    prompts = ["12 plus 30 equals", "7 plus"]  # different lengths: exercises left padding
    out = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=5)
    for prompt, s in zip(prompts, out):
        ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        expect = []
        with torch.no_grad():
            for _ in range(5):
                nxt = model(ids).logits[0, -1].argmax().item()
                expect.append(nxt)
                if nxt == tiny_tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert s.token_ids == expect
        assert s.ended == (tiny_tokenizer.eos_token_id in expect)


def test_top_k_one_is_greedy_and_sampling_is_seeded(tiny_base, tiny_tokenizer):
    model = _model(tiny_base)
    prompts = ["12 plus 30 equals"] * 4
    greedy = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=6)
    topk1 = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=1.0, top_k=1, generator_seed=0)
    assert [s.token_ids for s in greedy] == [s.token_ids for s in topk1]
    a = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=1.0, generator_seed=5)
    b = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=1.0, generator_seed=5)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    # An untrained model at temperature 1 almost surely gives different samples for 4 identical prompts.
    assert len({tuple(s.token_ids) for s in a}) > 1


def test_responses_are_cut_at_eos(tiny_base, tiny_tokenizer):
    model = _model(tiny_base)
    eos = tiny_tokenizer.eos_token_id
    # Make EOS the argmax everywhere by adding a large bias to its logit.
    forward = model.forward

    def biased(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., eos] += 1e4
        return out

    model.forward = biased
    s = generate_batch(model, tiny_tokenizer, ["hello"], max_new_tokens=5)[0]
    assert s.token_ids == [eos] and s.ended and s.text == ""


def _fixed_distribution(model, probs: dict[int, float]):
    """Make every next-token distribution the given one (token id -> probability, the rest ~0)."""
    forward = model.forward

    def fixed(*args, **kwargs):
        out = forward(*args, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        for t, p in probs.items():
            logits[..., t] = torch.log(torch.tensor(p))
        out.logits = logits
        return out

    model.forward = fixed


def test_top_p_keeps_the_smallest_set_with_that_much_probability(tiny_base, tiny_tokenizer):
    """Next-token probabilities 0.6 / 0.4 on two tokens: top_p 0.5 keeps only the first (0.6 >= 0.5), so every
    sampled token is it; top_p 0.9 needs both, and 32 x 4 draws (0.6^128 ~ 4e-29 to miss) show the second."""
    model = _model(tiny_base)
    a, b = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    _fixed_distribution(model, {a: 0.6, b: 0.4})
    prompts = ["12 plus 30 equals"] * 32
    nucleus = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=4, temperature=1.0, top_p=0.5, generator_seed=0)
    assert {t for s in nucleus for t in s.token_ids} == {a}
    wide = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=4, temperature=1.0, top_p=0.9, generator_seed=0)
    assert {t for s in wide for t in s.token_ids} == {a, b}


def test_chat_prompt_rendering(tiny_tokenizer):
    [text] = render_prompts(tiny_tokenizer, [[{"role": "user", "content": "what is 1 plus 2 ?"}]])
    assert text == "<|user|> what is 1 plus 2 ?<|assistant|>"
    assert render_prompts(tiny_tokenizer, ["plain"]) == ["plain"]


def test_cli_generate(tiny_base, tiny_tokenizer):
    r = subprocess.run([sys.executable, "-m", "lifecycle", "generate", "--model", str(tiny_base), "12 plus 30 equals",
                        "--max-new-tokens", "3", "--num", "2", "--temperature", "0.8", "--top-p", "0.9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("12 plus 30 equals") for ln in lines)
    # --chat prints the answer alone: greedy (the default), the same text as generate_batch on the rendered turn.
    r = subprocess.run([sys.executable, "-m", "lifecycle", "generate", "--model", str(tiny_base), "--chat", "what is 1 plus 2 ?",
                        "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    [prompt] = render_prompts(tiny_tokenizer, [[{"role": "user", "content": "what is 1 plus 2 ?"}]])
    [expect] = generate_batch(_model(tiny_base), tiny_tokenizer, [prompt], max_new_tokens=3)
    assert r.stdout.rstrip("\n") == expect.text and "<|user|>" not in r.stdout
