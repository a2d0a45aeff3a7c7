"""Data shapes for sft and reward, and every example file under examples/ accepted by its stage's reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.data import formats
from lifecycle.data.files import read_all, text_documents
from lifecycle.errors import UsageError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SFT_EXAMPLES = {
    "sft_messages.jsonl": formats.MESSAGES,
    "sft_prompt_completion.jsonl": formats.PROMPT_COMPLETION,
    "sft_prompt_completion_chat.jsonl": formats.PROMPT_COMPLETION,
    "sft_text.jsonl": formats.TEXT,
}
PREFERENCE_EXAMPLES = ["preferences.jsonl", "preferences_plain.jsonl"]


def test_every_example_file_is_covered():
    shipped = {p.name for p in EXAMPLES.iterdir() if p.is_file()}
    assert shipped == set(SFT_EXAMPLES) | set(PREFERENCE_EXAMPLES) | {"pretrain.txt"}


@pytest.mark.parametrize("name", sorted(SFT_EXAMPLES))
def test_sft_examples_are_accepted(name):
    shape, rows = formats.sft_rows(read_all([str(EXAMPLES / name)]))
    assert shape == SFT_EXAMPLES[name] and len(rows) >= 3


@pytest.mark.parametrize("name", PREFERENCE_EXAMPLES)
def test_preference_examples_are_accepted(name):
    rows = formats.preference_rows(read_all([str(EXAMPLES / name)]))
    assert len(rows) >= 3 and all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)


def test_pretrain_example_is_accepted():
    assert len(text_documents([str(EXAMPLES / "pretrain.txt")])) == 3


def test_plain_prompt_completion_becomes_chat_turns_unless_asked_not_to():
    rows = [{"prompt": "q", "completion": "a"}]
    _, chat = formats.sft_rows(rows)
    assert chat == [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    _, raw = formats.sft_rows(rows, chat_template=False)
    assert raw == rows


def test_column_mapping_and_sharegpt_messages():
    rows = [{"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    shape, out = formats.sft_rows(rows, messages_column="conv")
    assert shape == formats.MESSAGES
    assert out[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _, out = formats.sft_rows([{"question": "q", "answer": "a"}], prompt_column="question", completion_column="answer")
    assert out[0]["completion"][0]["content"] == "a"


@pytest.mark.parametrize("rows, fragment", [
    ([{"question": "q"}], "columns question; expected 'messages'"),
    ([{"prompt": "q"}], "found 'prompt' without its partner"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "no assistant message"),
    ([{"messages": [{"role": "robot", "content": "q"}]}], "role 'robot'"),
    ([{"messages": "hello"}], "expected a non-empty list"),
    ([{"text": "a"}, {"prompt": "b", "completion": "c"}], "row 2 has columns completion, prompt, but row 1 is text"),
    ([{"prompt": "q", "completion": " "}], "empty 'completion'"),
    ([{"text": 3}], "'text' is a int"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}], "empty assistant message"),
])
def test_bad_sft_rows_name_the_problem(rows, fragment):
    with pytest.raises(UsageError, match=None) as e:
        formats.sft_rows(rows)
    assert fragment in str(e.value)


@pytest.mark.parametrize("rows, fragment", [
    ([{"prompt": "q", "chosen": "a"}], "missing 'rejected'"),
    ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "identical"),
    ([{"prompt": "q", "chosen": "a", "rejected": 4}], "'rejected' is a int"),
    ([{"prompt": "q", "chosen": "", "rejected": "b"}], "empty"),
])
def test_bad_preference_rows_name_the_problem(rows, fragment):
    with pytest.raises(UsageError) as e:
        formats.preference_rows(rows)
    assert fragment in str(e.value)


def test_split_eval_is_seeded_and_keeps_at_least_one_row():
    rows = [{"text": str(i)} for i in range(10)]
    train, held = formats.split_eval(rows, 0.05, seed=1)
    assert len(held) == 1 and len(train) == 9
    assert formats.split_eval(rows, 0.3, seed=1) == formats.split_eval(rows, 0.3, seed=1)
    assert formats.split_eval(rows[:1], 0.5, seed=1) == (rows[:1], [])


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    """Spreadsheets save UTF-8 CSV with a byte-order mark; it must not become part of the first column's name."""
    from lifecycle.data.files import read_records

    p = tmp_path / "pairs.csv"
    p.write_bytes("\ufeffprompt,completion\nwhat is 1 plus 2 ?,3\n".encode("utf-8"))
    rows = read_records(str(p))
    assert rows == [{"prompt": "what is 1 plus 2 ?", "completion": "3"}]


@pytest.mark.parametrize("prompt, fragment", [
    ([{"role": "robot", "content": "q"}], "role 'robot'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ends with an assistant message"),
])
def test_rl_prompts_check_their_roles(prompt, fragment):
    from lifecycle.data.prompts import check_prompt

    with pytest.raises(UsageError) as e:
        check_prompt({"prompt": prompt}, 0, "prompt", "p.jsonl")
    assert fragment in str(e.value) and "row 1" in str(e.value)
    ok = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert check_prompt({"prompt": ok}, 0, "prompt", "p.jsonl") == ok
