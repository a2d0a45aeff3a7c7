"""Chat templates as hub tokenizers ship them: which tokens are the assistant's, and where a turn ends.

A hub chat template ends an assistant turn with its own marker (`<|im_end|>` in
ChatML, `<end_of_turn>` in Gemma, `<|eot_id|>` in Llama 3), often followed by
template whitespace, and seldom marks the assistant's tokens with
`{% generation %}` (which TRL's assistant-only loss needs). So we find the
assistant's tokens the way any template allows, by rendering prefixes:

    render(messages[:i], add_generation_prompt=True)  ->  the prompt for turn i
    render(messages[:i + 1])                           ->  ... plus turn i

Turn i is the tokens the second adds to the first, up to and including its
end-of-turn marker; the newline a template writes after the marker is layout,
not something the model must produce (generation stops at the marker).
Nothing here imports torch.
"""

from __future__ import annotations


def has_generation_markers(tokenizer) -> bool:
    """True when the chat template marks assistant tokens itself (`{% generation %}`), as `llm pretrain`'s does."""
    return "generation" in (tokenizer.chat_template or "") and "endgeneration" in (tokenizer.chat_template or "")


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def end_of_turn_ids(tokenizer) -> list[int]:
    """Special tokens that end an assistant turn in this template: render a probe turn and read what follows it."""
    probe = "Z7q"
    special = set(tokenizer.all_special_ids)
    try:
        ids = _ids(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
        head = _ids(tokenizer, [{"role": "user", "content": "hi"}], True)
    except Exception:  # a template that cannot render this probe (e.g. one that requires a system turn)
        ids, head = [], []
    tail = ids[len(head):] if ids[: len(head)] == head else []
    found = [t for t in tail if t in special]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(found[-1:] + eos))


def trim_layout(span: list[int], tokenizer, special: set[int] | None = None) -> list[int]:
    """Drop the whitespace a template writes after the end-of-turn marker (ChatML's newline after <|im_end|>)."""
    special = set(tokenizer.all_special_ids) if special is None else special
    k = len(span)
    while k > 1 and span[k - 1] not in special and span[k - 2] in special and not tokenizer.decode(span[k - 1:k]).strip():
        k -= 1
    return span[:k]


def assistant_mask(tokenizer, messages: list[dict], only_last: bool = False) -> tuple[list[int], list[int], int]:
    """(input_ids, mask, skipped): the whole conversation's ids and 1 on each assistant turn's tokens.

    A turn counts from its first content token through its end-of-turn marker.
    Templates that re-render earlier turns (some drop an earlier turn's
    reasoning) break the prefix property for those turns; they are left out of
    the loss and counted in `skipped`.
    """
    full = _ids(tokenizer, messages, False)
    mask = [0] * len(full)
    special = set(tokenizer.all_special_ids)
    skipped = 0
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if only_last else turns:
        head = _ids(tokenizer, messages[:i], True)
        upto = _ids(tokenizer, messages[: i + 1], False)
        if full[: len(upto)] != upto or upto[: len(head)] != head:
            skipped += 1
            continue
        span = trim_layout(upto[len(head):], tokenizer, special)
        for j in range(len(head), len(head) + len(span)):
            mask[j] = 1
    return full, mask, skipped


def tokenize_conversations(tokenizer, rows: list[dict]) -> tuple[list[dict], int]:
    """Rows of {input_ids, assistant_masks} for TRL (which builds labels from `assistant_masks`), and turns skipped.

    For prompt/completion rows the prompt's own assistant turns (few-shot
    examples) stay out of the loss: only turns after the prompt are masked in.
    """
    out, skipped = [], 0
    for row in rows:
        if "messages" in row:
            ids, mask, s = assistant_mask(tokenizer, row["messages"])
        else:
            msgs = list(row["prompt"]) + list(row["completion"])
            ids, mask, s = assistant_mask(tokenizer, msgs)
            head = _ids(tokenizer, list(row["prompt"]), True)
            mask = [0] * min(len(head), len(mask)) + mask[len(head):]
        skipped += s
        out.append({"input_ids": ids, "assistant_masks": mask})
    return out, skipped
