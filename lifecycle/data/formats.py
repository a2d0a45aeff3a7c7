"""Check users' rows and put them in the shapes TRL's trainers read.

SFT accepts three shapes (docs/data.md has an example file of each):

* conversational: `messages`, a list of {"role", "content"} (ShareGPT's
  {"from", "value"} with human/gpt roles is converted);
* prompt/completion: two strings, or two lists of messages;
* plain text: `text`.

Preference data (reward modelling) has `chosen` and `rejected` (strings or
lists of messages) and an optional shared `prompt`.

Column names can be mapped (--set prompt_column=question ...). Every problem
raises a UsageError that names the row, what was found and what is expected.
Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from lifecycle.errors import UsageError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt-completion", "text"


def _columns(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _messages(value: Any, where: str) -> list[dict]:
    """A list of {role, content} messages (ShareGPT {from, value} converted), checked."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where} is a {type(value).__name__}, expected a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise UsageError(f"{where} message {j + 1} is a {type(m).__name__}, expected an object with role and content")
        if "role" not in m and "from" in m:  # ShareGPT
            m = {"role": _SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"]), "content": m.get("value")}
        if m.get("role") not in ROLES:
            raise UsageError(f"{where} message {j + 1} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"{where} message {j + 1} has no string content (found {type(m.get('content')).__name__})")
        if m["role"] == "assistant" and not m["content"].strip():
            raise UsageError(f"{where} message {j + 1} is an empty assistant message; give it text or remove it")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _turn(value: Any, role: str, where: str) -> list[dict]:
    """A string as one message of `role`, or a list of messages as they are."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where)


def sft_format(row: dict, *, messages_column: str, prompt_column: str, completion_column: str, text_column: str) -> str:
    """Which of the three SFT shapes a row has; UsageError naming the columns found if none."""
    if messages_column in row:
        return MESSAGES
    if prompt_column in row and completion_column in row:
        return PROMPT_COMPLETION
    if text_column in row:
        return TEXT
    half = prompt_column if prompt_column in row else completion_column if completion_column in row else None
    hint = f" (found {half!r} without its partner)" if half else ""
    raise UsageError(
        f"SFT data has columns {_columns(row)}{hint}; expected {messages_column!r} (a list of messages), "
        f"{prompt_column!r} + {completion_column!r}, or {text_column!r}; "
        f"map yours with --set messages_column=NAME, prompt_column=NAME, completion_column=NAME or text_column=NAME"
    )


def sft_rows(rows: list[dict], *, messages_column: str = "messages", prompt_column: str = "prompt",
             completion_column: str = "completion", text_column: str = "text", chat_template: bool = True) -> tuple[str, list[dict]]:
    """(shape, rows in TRL's column names): {"messages"}, {"prompt", "completion"} or {"text"}.

    All rows must have the first row's shape. Plain-string prompt/completion
    pairs become a user and an assistant message when `chat_template` is on;
    a string paired with a list of messages is wrapped the same way.
    """
    if not rows:
        raise UsageError("the SFT data holds no rows; pass a file with at least one example")
    names = dict(messages_column=messages_column, prompt_column=prompt_column,
                 completion_column=completion_column, text_column=text_column)
    shape = sft_format(rows[0], **names)
    out = []
    for i, row in enumerate(rows, 1):
        where = f"row {i}"
        try:
            row_shape = sft_format(row, **names)
        except UsageError:
            row_shape = None
        if row_shape != shape:
            raise UsageError(f"{where} has columns {_columns(row)}, but row 1 is {shape} data; every row must have the same shape")
        if shape == MESSAGES:
            msgs = _messages(row[messages_column], f"{where} {messages_column!r}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise UsageError(f"{where} has no assistant message; SFT learns from assistant turns, so each conversation needs one")
            out.append({"messages": msgs})
        elif shape == PROMPT_COMPLETION:
            p, c = row[prompt_column], row[completion_column]
            if not isinstance(p, (str, list)) or not isinstance(c, (str, list)):
                raise UsageError(
                    f"{where}: {prompt_column!r} is a {type(p).__name__} and {completion_column!r} a {type(c).__name__}; "
                    f"expected strings or lists of messages"
                )
            if isinstance(c, str) and not c.strip():
                raise UsageError(f"{where} has an empty {completion_column!r}; every example needs something to learn")
            if isinstance(p, list) or isinstance(c, list) or chat_template:
                prompt = _turn(p, "user", f"{where} {prompt_column!r}") if p != "" else []
                completion = _turn(c, "assistant", f"{where} {completion_column!r}")
                out.append({"prompt": prompt, "completion": completion})
            else:
                out.append({"prompt": p, "completion": c})
        else:
            t = row[text_column]
            if not isinstance(t, str):
                raise UsageError(f"{where}: {text_column!r} is a {type(t).__name__}, expected a string")
            if t.strip():
                out.append({"text": t})
    if not out:
        raise UsageError(f"the SFT data holds no non-empty {text_column!r} text; pass a file with some text")
    if shape == PROMPT_COMPLETION and len({isinstance(r["prompt"], list) for r in out}) > 1:
        raise UsageError("prompt/completion rows mix plain strings and lists of messages; use one shape for every row")
    return shape, out


def is_conversational(rows: list[dict]) -> bool:
    first = rows[0]
    return any(isinstance(first.get(k), list) for k in ("messages", "prompt", "completion", "chosen", "rejected"))


def preference_rows(rows: list[dict], *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                    rejected_column: str = "rejected", chat_template: bool = True) -> list[dict]:
    """Rows as TRL preference pairs: {"chosen", "rejected"} plus "prompt" when the data has one.

    Refuses rows without both responses and pairs whose chosen and rejected are
    identical (they carry no preference and make the loss pull nowhere).
    """
    if not rows:
        raise UsageError("the preference data holds no rows; pass a file with at least one pair")
    first = rows[0]
    missing = [c for c in (chosen_column, rejected_column) if c not in first]
    if missing:
        raise UsageError(
            f"preference data has columns {_columns(first)}, missing {' and '.join(repr(m) for m in missing)}; "
            f"expected {chosen_column!r} and {rejected_column!r} (the preferred and the dispreferred response) and "
            f"optionally {prompt_column!r}; map yours with --set chosen_column=NAME rejected_column=NAME"
        )
    has_prompt = prompt_column in first
    out, identical = [], []
    for i, row in enumerate(rows, 1):
        where = f"row {i}"
        for c in (chosen_column, rejected_column) + ((prompt_column,) if has_prompt else ()):
            if c not in row:
                raise UsageError(f"{where} has no {c!r} column (columns found: {_columns(row)}); every pair needs it")
            if not isinstance(row[c], (str, list)):
                raise UsageError(f"{where}: {c!r} is a {type(row[c]).__name__}, expected a string or a list of messages")
        ch, rj = row[chosen_column], row[rejected_column]
        p = row[prompt_column] if has_prompt else None
        if (isinstance(ch, str) and not ch.strip()) or (isinstance(rj, str) and not rj.strip()):
            raise UsageError(f"{where} has an empty {chosen_column!r} or {rejected_column!r}; both responses must say something")
        if ch == rj:
            identical.append(i)
            continue
        chat = any(isinstance(x, list) for x in (ch, rj, p)) or (chat_template and has_prompt)
        if chat:
            pair = {"chosen": _turn(ch, "assistant", f"{where} {chosen_column!r}"),
                    "rejected": _turn(rj, "assistant", f"{where} {rejected_column!r}")}
            if has_prompt:
                pair["prompt"] = _turn(p, "user", f"{where} {prompt_column!r}") if p != "" else []
        else:
            pair = {"chosen": ch, "rejected": rj}
            if has_prompt:
                pair["prompt"] = p
        out.append(pair)
    if identical:
        raise UsageError(
            f"{len(identical)} pair(s) have identical {chosen_column!r} and {rejected_column!r} (first: row {identical[0]}); "
            f"such a pair states no preference: remove it or fix the responses"
        )
    shapes = {isinstance(r["chosen"], list) for r in out}
    if len(shapes) > 1:
        raise UsageError("preference rows mix plain strings and lists of messages; use one shape for every row")
    return out


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random `fraction` of rows held out (at least one when fraction > 0 and rows > 1)."""
    import random

    if fraction <= 0 or len(rows) < 2:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed * 7 + 1).shuffle(idx)
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
