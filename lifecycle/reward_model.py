"""Score (prompt, response) pairs with a reward model: one call, any padding side.

The reward artifact is a stock `AutoModelForSequenceClassification` with one
label. Its score for a sequence is the head's output at the last real token:
the end of the response, where the whole exchange has been read. `encode` is
the one place that turns a (prompt, response) pair into token ids, so the
reward stage trains on exactly the sequences that `score` reads later (in PPO).

Why not call the model's own forward and read `.logits`: the stock classifier
finds the last token as "the rightmost token that is not the pad token", which
is wrong when pad == eos (the response's own EOS is skipped), and it builds no
position ids, so a left-padded row would see shifted positions. `score_tokens`
uses the attention mask for both.
"""

from __future__ import annotations

from typing import Any, Sequence

Message = dict  # {"role": ..., "content": ...}


def _is_chat(x: Any) -> bool:
    return isinstance(x, list)


def encode(tokenizer, prompts: Sequence, responses: Sequence, max_length: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of prompt + response, as the reward stage trains on them; and how many were truncated.

    * conversational (either side a list of messages): the chat template renders
      prompt messages + response (a string becomes one assistant message), up to
      and including the turn's end-of-turn marker (a hub template's newline
      after `<|im_end|>` is dropped), so the score is read at the marker;
    * plain strings: prompt + response + EOS (unless the response already ends
      with EOS or the template's end-of-turn marker), tokenized as text, exactly
      as given. A rendered chat prompt (a string from `generate.render_prompts`)
      plus the text the model generated after it, marker included, lands here
      and gives the same ids as the conversational form.

    A string response wrapped into an assistant message is stripped of
    surrounding whitespace, since chat templates add their own.

    Sequences longer than `max_length` keep their last `max_length` tokens: the
    score is read at the end, so the end must survive.
    """
    from lifecycle.data.chat import end_of_turn_ids, trim_layout

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos = tokenizer.eos_token or ""
    ends = tuple(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))) if tokenizer.chat_template else ()
    ends = tuple(e for e in ends if e) or ((eos,) if eos else ())
    out, truncated = [], 0
    for prompt, response in zip(prompts, responses):
        if _is_chat(prompt) or _is_chat(response):
            msgs = (prompt if _is_chat(prompt) else ([{"role": "user", "content": prompt}] if prompt else []))
            msgs = msgs + (response if _is_chat(response) else [{"role": "assistant", "content": response.strip()}])
            ids = trim_layout(list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]), tokenizer)
        else:
            text = (prompt or "") + response
            if eos and not text.endswith(ends):
                text += eos
            ids = tokenizer(text)["input_ids"]
        ids = list(ids)
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
            truncated += 1
        out.append(ids)
    return out, truncated


def _backbone_and_head(model):
    """(transformer body, score head) of a sequence classifier, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


def score_tokens(model, input_ids, attention_mask):
    """Scores (B,) at each row's last attended token; rows may be left- or right-padded.

    input_ids, attention_mask: (B, T). Position ids count real tokens only, so a
    row scores the same whichever side it is padded on.
    """
    import torch

    body, head = _backbone_and_head(model)
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state  # (B, T, H)
    t = torch.arange(mask.shape[1], device=mask.device)
    last = (t * mask).argmax(-1)  # (B,) index of the last real token
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return head(h.to(_head_dtype(head))).squeeze(-1).float()  # (B,)


def _head_dtype(head):
    """The dtype the score head computes in: under peft, its trained copy's (fp32 over a 16-bit base)."""
    active = getattr(head, "modules_to_save", None)
    if active is not None and getattr(head, "active_adapters", None):
        name = head.active_adapters[0]
        if name in active:
            return next(active[name].parameters()).dtype
    return next(head.parameters()).dtype


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """(input_ids, attention_mask) tensors (B, T) from token lists."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def score(model, tokenizer, prompts: Sequence, responses: Sequence, *, batch_size: int = 128,
          max_length: int | None = None) -> list[float]:
    """Reward scores for (prompt, response) pairs, one float each.

    Prompts and responses are strings or lists of chat messages (see `encode`).
    The padding side follows the tokenizer; it does not change the result.
    """
    import torch

    seqs, _ = encode(tokenizer, prompts, responses, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = getattr(tokenizer, "padding_side", "right") or "right"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                ids, mask = pad_batch(seqs[i : i + batch_size], pad, side)
                out.extend(score_tokens(model, ids.to(device), mask.to(device)).tolist())
    finally:
        model.train(was_training)
    return out


def pairwise_accuracy(model, tokenizer, pairs: list[dict], *, batch_size: int = 128, max_length: int | None = None) -> dict:
    """Share of pairs whose chosen response outscores the rejected one, and the mean margin.

    `pairs` rows have chosen, rejected and optionally prompt (TRL's preference format).
    """
    prompts = [p.get("prompt", "") for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size=batch_size, max_length=max_length)
    rejected = score(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size=batch_size, max_length=max_length)
    diffs = [c - r for c, r in zip(chosen, rejected)]
    n = max(len(diffs), 1)
    return {
        "accuracy": sum(d > 0 for d in diffs) / n,
        "margin": sum(diffs) / n,
        "mean_score": (sum(chosen) + sum(rejected)) / (2 * n),
        "n": len(diffs),
    }


def load_reward_model(path: str, dtype: str = "float32"):
    """Load a reward artifact (stock AutoModelForSequenceClassification, one label) for scoring."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lifecycle.modeling import REWARD_HEAD, _attention_for_path

    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=_attention_for_path(path, REWARD_HEAD))
    model.eval()
    return model
