"""Sampling: greedy, temperature, top-k, top-p, batched with a KV cache; chat; gold accuracy.

Batched generation uses `transformers`' `generate` (KV cache, left padding),
with two guards that hub models need:

* Stop ids. A hub model lists several (generation_config.eos_token_id may be a
  list), and its chat template ends a turn with its own marker (`<|im_end|>`,
  `<end_of_turn>`, `<|eot_id|>`), not with EOS. Sampling stops at any of them
  (`stop_ids`) and a response is cut at the first; `ended` tells whether it
  emitted one or ran into the length limit (the gold checker counts the latter wrong).
* No hidden settings. `generate` fills every option it is not given from
  `model.generation_config` (repetition penalty, no-repeat n-grams, top-k,
  top-p, min-p, suppressed tokens, ...), so a hub model would sample from a
  distribution other than softmax(logits / T), the one PPO's log-probabilities
  assume. During our calls the model's generation_config is an empty one: only
  the options passed here apply.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from lifecycle.artifacts import CAUSAL_LM, check_artifact
from lifecycle.data import world
from lifecycle.data.chat import end_of_turn_ids
from lifecycle.errors import UsageError
from lifecycle.modeling import load_causal_lm
from lifecycle.tokenizer import load_tokenizer


@dataclass
class Sample:
    prompt: str  # the rendered prompt text
    text: str  # decoded response, special tokens removed
    ended: bool  # True if the response ends with a stop id
    token_ids: list  # response token ids, the stop id included when present
    logprobs: list | None = None  # log-probability of each token under the distribution it was drawn from (on request)


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Chat prompts (lists of messages) through the chat template; plain strings pass through."""
    out = []
    for p in prompts:
        if isinstance(p, list):
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
        else:
            out.append(p)
    return out


def _hf_model(model):
    """The transformers model under a peft wrapper (the one whose generation_config generate reads)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stop_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the model's generation_config EOS id(s), the tokenizer's EOS, and the
    chat template's end-of-turn token (`data.chat.end_of_turn_ids`). In that order, without repeats."""
    ids: list = []
    if model is not None:
        eos = getattr(_hf_model(model).generation_config, "eos_token_id", None)
        ids += eos if isinstance(eos, (list, tuple)) else [eos]
    ids += [tokenizer.eos_token_id] + (end_of_turn_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else [])
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@contextlib.contextmanager
def own_settings_only(model):
    """Within the block, `model.generate` sees an empty generation_config: nothing from the hub's file applies.

    A mixture of experts also stops returning router logits (TRL turns them on for
    the load-balancing loss); transformers' auxiliary loss cannot be computed on
    a KV-cached step, and sampling has no use for it.
    """
    hf = _hf_model(model)
    saved = hf.generation_config
    text_config = hf.config.get_text_config()
    router = getattr(text_config, "output_router_logits", False)
    hf.generation_config = GenerationConfig()
    if router:
        text_config.output_router_logits = False
    try:
        yield
    finally:
        hf.generation_config = saved
        if router:
            text_config.output_router_logits = router


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 256,
    generator_seed: int | None = None,
    stop: list[int] | None = None,
    return_logprobs: bool = False,
) -> list[Sample]:
    """Generate one response per rendered prompt; greedy when temperature is 0.

    Sampling draws from softmax(logits / temperature), restricted by top_k and
    top_p when set, and by nothing else. `stop` defaults to `stop_ids(tokenizer, model)`.
    With `return_logprobs` each sample carries the log-probability of each of its
    tokens under the distribution it was drawn from (the raw logits when greedy).
    """
    stop = stop_ids(tokenizer, model) if stop is None else list(stop)
    stops = set(stop)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(model.parameters()).device
    out: list[Sample] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
            if temperature > 0:
                kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            else:
                kw.update(temperature=None, top_k=None, top_p=None)
            if return_logprobs:
                kw.update(output_scores=True, return_dict_in_generate=True)
            with torch.no_grad(), own_settings_only(model):
                res = model.generate(**enc, **kw)
            seq = res.sequences if return_logprobs else res
            new = seq[:, enc["input_ids"].shape[1] :]  # (b, t) sampled tokens, pad after the end
            if return_logprobs:  # scores: t tensors (b, V), what each token was drawn from
                lp = torch.stack([torch.log_softmax(s.float(), -1) for s in res.scores], 1)  # (b, t, V)
                lp = torch.gather(lp, -1, new.unsqueeze(-1)).squeeze(-1).tolist()
            for j, (prompt, ids) in enumerate(zip(chunk, new.tolist())):
                cut = next((k for k, t in enumerate(ids) if t in stops), None)
                ended = cut is not None
                ids = ids[: cut + 1] if ended else ids
                text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                out.append(Sample(prompt, text, ended, ids, lp[j][: len(ids)] if return_logprobs else None))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def gold_accuracy(model, tokenizer, problems, *, max_new_tokens: int = 6, batch_size: int = 250) -> dict:
    """Greedy answers to built-in world problems judged by the gold checker.

    Returns {"gold_accuracy", "gold_accuracy_carry", "gold_accuracy_nocarry", "n"}.
    """
    prompts = render_prompts(tokenizer, [[world.user(p.question)] for p in problems])
    samples = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    right = [world.gold_check(p.question, s.text, s.ended) for p, s in zip(problems, samples)]
    carry = [r for r, p in zip(right, problems) if p.has_carry]
    nocarry = [r for r, p in zip(right, problems) if not p.has_carry]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "gold_accuracy": mean(right),
        "gold_accuracy_carry": mean(carry),
        "gold_accuracy_nocarry": mean(nocarry),
        "n": len(right),
    }


def world_pairs(policy, tokenizer, problems: list, *, k: int, temperature: float, seed: int) -> tuple[list[dict], float]:
    """Preference pairs on built-in world problems from the policy's own samples, judged by the gold checker
    (chosen right, rejected wrong; `world.preference_pairs`), and the share of samples that were right.
    `llm reward` and `llm dpo` both learn from these pairs."""
    prompts = render_prompts(tokenizer, [[world.user(p.question)] for p in problems])
    samples = generate_batch(policy, tokenizer, [q for q in prompts for _ in range(k)], max_new_tokens=6,
                             temperature=temperature, generator_seed=seed)
    # A sample cut off by the length limit never ended: neither a fair chosen nor a fair rejected.
    # Strip the decoded text: the chat template puts its own space before the content.
    texts = [[s.text.strip() for s in samples[i * k:(i + 1) * k] if s.ended] for i in range(len(problems))]
    right = sum(world.gold_check(problems[i // k].question, s.text, s.ended) for i, s in enumerate(samples))
    return world.preference_pairs(problems, seed=seed, samples=texts), right / max(len(samples), 1)


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int) -> float:
    """Mean KL(π(y|x) || π_ref(y|x)) in nats per response, over responses sampled from π at temperature 1:
    exact per token (a sum over the vocabulary), summed along each response (the chain rule of KL).
    `reference` None: the policy is a peft model whose reference is its adapter disabled."""
    with torch.random.fork_rng():  # the training run's random stream is left where it was
        samples = generate_batch(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                                 generator_seed=seed)
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    seqs = [e + s.token_ids for e, s in zip(enc, samples)]
    T = max(len(s) for s in seqs)
    device = next(policy.parameters()).device
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id or 0, dtype=torch.long, device=device)  # (B, T)
    attn = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
    resp = torch.zeros((len(seqs), T), dtype=torch.bool, device=device)  # (B, T) next token is a response token
    for i, (e, s) in enumerate(zip(enc, seqs)):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
        resp[i, len(e) - 1 : len(s) - 1] = True
    was = policy.training
    policy.eval()
    try:
        lp = torch.log_softmax(policy(input_ids=ids, attention_mask=attn).logits.float(), -1)  # (B, T, V)
        if reference is None:
            with policy.disable_adapter():
                lq = torch.log_softmax(policy(input_ids=ids, attention_mask=attn).logits.float(), -1)
        else:
            lq = torch.log_softmax(reference(input_ids=ids, attention_mask=attn).logits.float(), -1)
    finally:
        policy.train(was)
    kl_tok = (lp.exp() * (lp - lq)).sum(-1)  # (B, T) exact KL(π(·|s_t) || π_ref(·|s_t))
    return (kl_tok * resp).sum().item() / max(len(seqs), 1)


def check_context(info, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and the tokens to generate must fit the model's context (its config's position count)."""
    from lifecycle import guard

    room = (guard.context_of(info) or 0) - prompt_tokens
    fix = f"lower --max-new-tokens to {room} or less" if room > 0 else "shorten the prompt"
    guard.check_context(info, prompt_tokens + max_new_tokens,
                        f"the prompt ({prompt_tokens} tokens) with --max-new-tokens {max_new_tokens}", fix)


def load_checked(info):
    """The model, refusing weights that do not belong to config.json's architecture (transformers would
    initialise the missing tensors at random and sample from noise)."""
    if info.hub:
        return load_causal_lm(info.path)
    from transformers import AutoModelForCausalLM

    from lifecycle.modeling import CAUSAL_HEAD, _attention_for_path

    model, loading = AutoModelForCausalLM.from_pretrained(
        info.path, dtype=torch.float32, attn_implementation=_attention_for_path(info.path, CAUSAL_HEAD, False),
        output_loading_info=True)
    missing = loading.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise UsageError(f"--model {info.path}: the weights do not match config.json (model_type "
                         f"{model.config.model_type!r}): {len(missing)} tensors missing ({shown}, ...); put back the "
                         f"config.json written with these weights")
    return model


def generate_cli(model_path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, num: int, chat: bool, seed: int) -> None:
    """`llm generate`: print `num` samples for one prompt (stopping at every stop id of the model)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty; give the text to continue, e.g. llm generate --model DIR 'the sum of 2 and 3 is'")
    info = check_artifact(model_path, CAUSAL_LM, "--model")
    tokenizer = load_tokenizer(info.path)
    if chat:
        if not tokenizer.chat_template:
            raise UsageError(f"the tokenizer in {model_path} has no chat template; drop --chat")
        text = render_prompts(tokenizer, [[{"role": "user", "content": prompt}]])[0]
    else:
        text = prompt
    check_context(info, len(tokenizer(text, add_special_tokens=False)["input_ids"]), max_new_tokens)
    model = load_checked(info)
    samples = generate_batch(model, tokenizer, [text] * num, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator_seed=seed)
    for s in samples:
        print(s.text if chat else prompt + s.text)
