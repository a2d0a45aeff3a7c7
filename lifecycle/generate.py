"""Sampling: greedy, temperature, top-k, top-p, batched with a KV cache; chat; gold accuracy.

Batched generation uses `transformers`' `generate` (KV cache, left padding).
Responses are cut at the first EOS; `ended` tells whether the model emitted
EOS or ran into the length limit (the gold checker counts the latter wrong).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    prompt: str  # the rendered prompt text
    text: str  # decoded response, special tokens removed
    ended: bool  # True if the response ends with EOS
    token_ids: list  # response token ids, EOS included when present


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Chat prompts (lists of messages) through the chat template; plain strings pass through."""
    out = []
    for p in prompts:
        if isinstance(p, list):
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
        else:
            out.append(p)
    return out


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
) -> list[Sample]:
    """Generate one response per rendered prompt; greedy when temperature is 0."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
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
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            if temperature > 0:
                kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            else:
                kw.update(temperature=None, top_k=None, top_p=None)
            with torch.no_grad():
                seq = model.generate(**enc, **kw)
            resp = seq[:, enc["input_ids"].shape[1] :].tolist()
            for prompt, ids in zip(chunk, resp):
                ended = eos in ids
                ids = ids[: ids.index(eos) + 1] if ended else ids
                text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
                out.append(Sample(prompt, text, ended, ids))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def gold_accuracy(model, tokenizer, problems, *, max_new_tokens: int = 6, batch_size: int = 250) -> dict:
    """Greedy answers to built-in world problems judged by the gold checker.

    Returns {"gold_accuracy", "gold_accuracy_carry", "gold_accuracy_nocarry", "n"}.
    """
    from lifecycle.data import world

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


def generate_cli(model_path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, num: int, chat: bool, seed: int) -> None:
    """`llm generate`: print `num` samples for one prompt."""
    from lifecycle.artifacts import CAUSAL_LM, check_artifact
    from lifecycle.modeling import load_causal_lm
    from lifecycle.tokenizer import load_tokenizer

    info = check_artifact(model_path, CAUSAL_LM, "--model")
    tokenizer = load_tokenizer(info.path)
    model = load_causal_lm(info.path)
    if chat:
        if not tokenizer.chat_template:
            from lifecycle.errors import UsageError

            raise UsageError(f"the tokenizer in {model_path} has no chat template; drop --chat")
        text = render_prompts(tokenizer, [[{"role": "user", "content": prompt}]])[0]
    else:
        text = prompt
    samples = generate_batch(model, tokenizer, [text] * num, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator_seed=seed)
    for s in samples:
        print(s.text if chat else prompt + s.text)
