"""Sampling on hub-style models: exactly softmax(logits / T), whatever the model's generation_config says,
and responses that stop at every stop id (the chat template's end-of-turn marker included).

The `family_dir` models ship a generation_config with repetition_penalty=1.3, top_k=20,
top_p=0.8, temperature=0.7 and two stop ids (<|im_end|>, <|endoftext|>), as hub models do.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import EOT, IM_END
from lifecycle import rl
from lifecycle.data.chat import end_of_turn_ids
from lifecycle.generate import generate_batch, render_prompts, stop_ids
from lifecycle.tokenizer import load_tokenizer

T = 0.8  # our temperature: not the hub's 0.7


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


def _recomputed_logprobs(model, tok, prompt: str, response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token, from one forward pass over prompt + response (no padding)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids + response])
    with torch.no_grad():
        logits = model(x).logits[:, len(ids) - 1 : -1]  # (1, T, V): the positions that predict the response
    return rl.logprobs_from_logits(logits, torch.tensor([response]), temperature)[0]


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_sampler_logprobs_are_softmax_of_logits_over_t(family, family_dir):
    model, tok = _load(family_dir(family))
    gc = model.generation_config
    assert (gc.repetition_penalty, gc.top_k, gc.top_p) == (1.3, 20, 0.8)  # the hub settings that must not apply
    prompts = render_prompts(tok, [[{"role": "user", "content": q}] for q in ("what is 2 plus 2 ?", "hi", "what is 12 plus 30 ?")])
    samples = generate_batch(model, tok, prompts, max_new_tokens=12, temperature=T, generator_seed=0, return_logprobs=True)
    checked = 0
    for p, s in zip(prompts, samples):
        expect = _recomputed_logprobs(model, tok, p, s.token_ids, T)
        assert torch.allclose(torch.tensor(s.logprobs), expect, atol=2e-5), (s.logprobs, expect.tolist())
        checked += len(s.token_ids)
    assert checked >= 12
    assert model.generation_config.repetition_penalty == 1.3  # and the model's own settings are left as they were


def test_stock_generate_would_apply_the_hub_settings(family_dir):
    """The reason for the guard: stock generate() with only temperature given still applies the hub's
    repetition penalty and top-k, so its sampling distribution is not softmax(logits / T)."""
    model, tok = _load(family_dir("qwen3"))
    [prompt] = render_prompts(tok, [[{"role": "user", "content": "what is 2 plus 2 ?"}]])
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=T, max_new_tokens=6, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    first = torch.log_softmax(out.scores[0][0].float(), -1)
    assert torch.isinf(first).sum() > 0  # top-k / top-p removed tokens: not softmax(logits / T)


def test_stop_ids_of_a_hub_model(family_dir, chatml_tokenizer, tiny_tokenizer):
    model, tok = _load(family_dir("llama"))
    im_end, eot = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)
    assert end_of_turn_ids(chatml_tokenizer)[0] == im_end
    assert stop_ids(tok, model) == [im_end, eot]
    assert stop_ids(tok) == [eot, im_end]  # without a model: EOS, then the template's end-of-turn token
    # The built-in template ends a turn with EOS itself: one stop id.
    assert end_of_turn_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    assert stop_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]


@pytest.mark.parametrize("marker", [IM_END, EOT])
def test_sampling_stops_at_each_stop_id(marker, family_dir):
    """Make `marker` the likeliest token from the third response token on: the response ends right there,
    the marker included in token_ids and absent from the text; a batch row that ended early is cut."""
    model, tok = _load(family_dir("qwen3"))
    mid = tok.convert_tokens_to_ids(marker)
    prompts = render_prompts(tok, [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is 12 plus 30 ?"}]])
    forward, calls = model.forward, []

    def biased(*args, **kwargs):  # call 1 (the prompt) draws response token 1, call k draws token k
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:  # two response tokens are in: from now on the marker wins
            out.logits[..., mid] += 1e4
        return out

    model.forward = biased
    for s in generate_batch(model, tok, prompts, max_new_tokens=8, temperature=1.0, generator_seed=0):
        assert s.ended and s.token_ids[-1] == mid and len(s.token_ids) == 3, s.token_ids
        assert marker not in s.text


@pytest.mark.parametrize("base", ["tiny_base", "tiny_gpt2_base"])
def test_sampler_logprobs_equal_the_rollouts_recomputed_ones_with_left_padding(base, request):
    """The PPO rollout recomputes log π_old over left-padded prompts (`Rollout.model_inputs`, `response_logits`):
    on llama and gpt2 micro models it must give the sampler's own log-probs, token by token. A position-id or
    logits-slice off by one fails this."""
    from lifecycle.roles import Roles, response_logits

    path = request.getfixturevalue(base)
    model, tok = _load(path)
    qs = ("what is 2 plus 2 ?", "hi", "what is 12 plus 30 ? and what is 7 plus 5 ?")
    prompts = render_prompts(tok, [[{"role": "user", "content": q}] for q in qs])
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3  # real left padding
    samples = generate_batch(model, tok, prompts, max_new_tokens=6, temperature=T, generator_seed=0, return_logprobs=True)
    r = Roles.to_rollout(type("R", (), {"tok": tok})(), prompts, samples, "cpu")
    with torch.no_grad():
        lp = rl.logprobs_from_logits(response_logits(model, r), r.response_ids, T)
    for i, s in enumerate(samples):
        assert torch.allclose(lp[i, : len(s.token_ids)], torch.tensor(s.logprobs), atol=1e-5), (i, lp[i], s.logprobs)


def test_values_are_read_at_the_position_before_each_action():
    """`Rollout.at_responses`: V(s_t) comes from the position that has seen the prompt and a_<t, i.e. the last
    prompt token for t = 0 and a_{t-1} after. A per-position output equal to the input token shows it."""
    from lifecycle.rl import Rollout

    prompt = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])  # left-padded with 0
    pmask = (prompt != 0).long()
    resp = torch.tensor([[13, 14, 15], [25, 26, 0]])
    rmask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    r = Rollout.sampled(prompt, pmask, resp, rmask, torch.tensor([True, True]))
    ids, mask, pos = r.model_inputs()
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 5]]  # pad positions clamp to 0 / repeat
    assert r.at_responses(ids).tolist() == [[12, 13, 14], [24, 25, 26]]
