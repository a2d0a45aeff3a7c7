"""`llm eval`: bits per byte against a hand computation, win rates, lm-eval on a local task, a whole lifecycle, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifecycle import eval as ev
from lifecycle.config import EvalConfig, build_config
from lifecycle.errors import UsageError

DOCS = ["12 plus 7 equals 19 .", "the sum of 48 and 87 is 135 . add 3 and 4 to get 7 .", "héllo wörld: bytes ≠ characters"]


def cfg(**kw) -> EvalConfig:
    kw.setdefault("decontaminate", False)
    return build_config(EvalConfig, None, kw)


@pytest.fixture(scope="module")
def lm(tiny_base):
    from lifecycle.modeling import load_causal_lm
    from lifecycle.tokenizer import load_tokenizer

    return load_causal_lm(str(tiny_base)).eval(), load_tokenizer(str(tiny_base))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_base):
    """A reward-kind artifact: the tiny base's shape with a random one-label score head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    conf = AutoConfig.from_pretrained(tiny_base, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(conf)
    out = tmp_path_factory.mktemp("rm")
    save_model_artifact(model, tok, out, stage="reward", config={}, metrics={}, parent=None, seed=0)
    return out


def hand_nats(model, tokenizer, doc: str) -> tuple[float, int]:
    """-Σ log p(token | all before it) over one unpadded row [EOS] + ids, log-softmax taken here in float64."""
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    full = torch.tensor([[tokenizer.eos_token_id] + ids])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].double()  # (T, V)
    total = 0.0
    for t in range(len(ids)):
        row = logits[t]
        total -= (row[full[0, t + 1]] - torch.logsumexp(row, 0)).item()
    return total, len(ids)


# ---------------------------------------------------------------------------
# 1. Bits per byte and perplexity
# ---------------------------------------------------------------------------
def test_bits_per_byte_matches_hand_computation(lm):
    model, tok = lm
    per_doc = ev.document_nats(model, tok, DOCS, seq_len=512, batch_size=2)  # padded, batched, sorted by length
    hand = [hand_nats(model, tok, d) for d in DOCS]
    for (n, t, b), (hn, ht), d in zip(per_doc, hand, DOCS):
        assert t == ht and b == len(d.encode("utf-8"))
        assert n == pytest.approx(hn, rel=1e-6)
    r = ev.bits_per_byte(per_doc)
    nats, tokens = sum(h[0] for h in hand), sum(h[1] for h in hand)
    nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert nbytes > sum(len(d) for d in DOCS)  # the non-ASCII characters count as their UTF-8 bytes
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-6)
    assert (r["tokens"], r["bytes"], r["documents"]) == (tokens, nbytes, 3)


def test_uniform_model_closed_form(lm):
    """Zero logits give every token probability 1/V: bpb = tokens · ln V / (ln 2 · bytes), perplexity = V."""
    import copy

    model, tok = lm
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.get_output_embeddings().weight.zero_()
    V = uniform.config.vocab_size
    r = ev.bits_per_byte(ev.document_nats(uniform, tok, DOCS, seq_len=8, batch_size=4))  # windowed: same answer
    assert r["perplexity"] == pytest.approx(V, rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log(V) / (math.log(2) * r["bytes"]), rel=1e-9)


def test_windows_predict_every_token_once():
    assert ev.windows([1, 2, 3, 4, 5, 6, 7, 8, 9], 0, 4) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert ev.windows([1, 2, 3], 0, 8) == [[0, 1, 2, 3]]
    for n in range(1, 12):
        ws = ev.windows(list(range(1, n + 1)), 0, 3)
        assert sum(len(w) - 1 for w in ws) == n and [t for w in ws for t in w[1:]] == list(range(1, n + 1))


def test_windowed_equals_full_context_when_the_window_holds_the_document(lm):
    model, tok = lm
    a = ev.document_nats(model, tok, DOCS, seq_len=64, batch_size=8)
    b = ev.document_nats(model, tok, DOCS, seq_len=512, batch_size=1)
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-9)


# ---------------------------------------------------------------------------
# 3. Win rates
# ---------------------------------------------------------------------------
def test_win_rate_counts_ties_half_and_brackets_its_mean():
    out = ev.compare([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0])
    assert out == [1.0, 0.0, 0.5, 1.0]
    w = ev.win_rate(out * 25)
    assert w["win_rate"] == pytest.approx(0.625) and (w["wins"], w["ties"], w["losses"], w["n"]) == (50, 25, 25, 100)
    assert w["ci_low"] < 0.625 < w["ci_high"] and w["ci_high"] - w["ci_low"] < 0.25
    assert ev.win_rate([0.5] * 10) == {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "wins": 0, "ties": 10, "losses": 0, "n": 10}


def test_model_against_itself_wins_half(tiny_base, reward_dir, tmp_path):
    out = tmp_path / "self"
    ev.run(cfg(model=str(tiny_base), vs=str(tiny_base), reward=str(reward_dir), out=str(out), problems=24, docs=6))
    res = json.loads((out / "eval.json").read_text())
    names = list(res["models"])
    assert len(names) == 2
    wr = res["models"][names[0]]["win_rate"]
    for kind in ("reward", "gold"):
        w = wr[kind]
        assert w["ci_low"] <= 0.5 <= w["ci_high"] and w["win_rate"] == 0.5 and w["n"] == 24
    a, b = (res["models"][n] for n in names)
    assert a["language_modelling"] == b["language_modelling"] and a["world"] == b["world"]
    assert a["world"]["n"] == 24 and a["language_modelling"]["documents"] == 6
    report = (out / "report.md").read_text()
    assert "| bits per byte |" in report and "reward-model win rate" in report and "ties count half" in report
    assert (out / "plots" / "metrics.png").stat().st_size > 0 and (out / "plots" / "win_rates.png").stat().st_size > 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 24


def test_gold_accuracy_is_the_stages_number(tiny_base, lm, tmp_path):
    """The world numbers are what generate.gold_accuracy (the stages' metric) reports on the same problems."""
    from lifecycle.data import world
    from lifecycle.generate import gold_accuracy

    model, tok = lm
    out = tmp_path / "g"
    ev.run(cfg(model=str(tiny_base), out=str(out), problems=30, docs=2))
    got = json.loads((out / "eval.json").read_text())["models"][Path(tiny_base).name]["world"]
    assert got == gold_accuracy(model, tok, world.heldout_problems(30))


# ---------------------------------------------------------------------------
# 4. lm-evaluation-harness on a local task
# ---------------------------------------------------------------------------
ITEMS = [
    {"question": "12 plus 7 equals", "choices": ["19", "21", "5"], "label": 0},
    {"question": "the sum of 48 and 87 is", "choices": ["125", "135"], "label": 1},
    {"question": "add 3 and 4 to get", "choices": ["7", "8", "6", "1"], "label": 0},
    {"question": "what is 9 plus 9 ? it is", "choices": ["18", "81"], "label": 0},
    {"question": "40 plus 2 equals", "choices": ["24", "42", "44"], "label": 1},
    {"question": "the sum of 5 and 5 is", "choices": ["55", "0", "10"], "label": 2},
]
TASK_YAML = """task: sums_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (d / "sums.yaml").write_text(TASK_YAML.format(path=d / "sums.jsonl"))
    return d


def hand_accuracy(model, tok) -> float:
    """The choice with the highest log p(" " + choice | question), counted by hand: the share that is the label."""
    right = 0
    for item in ITEMS:
        ctx = tok(item["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for c in item["choices"]:
            whole = tok(item["question"] + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            assert whole[: len(ctx)] == ctx  # the split lm-eval makes is at the context's own tokens
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        right += max(range(len(lls)), key=lambda i: lls[i]) == item["label"]
    return right / len(ITEMS)


def _harness_accuracy(path: str, task_dir: Path) -> tuple[float, object]:
    m = ev.load_model(path, "--model")
    res = ev.harness(m, cfg(model=path, out="unused", tasks=["sums_local"], task_dir=str(task_dir), batch_size=4))
    assert res["sums_local"]["n"] == len(ITEMS) and res["sums_local"]["num_fewshot"] == 0
    return res["sums_local"]["acc"], m


def test_lm_eval_local_task_plain_model(tiny_base, task_dir):
    acc, m = _harness_accuracy(str(tiny_base), task_dir)
    assert m.adapter is None
    assert acc == pytest.approx(hand_accuracy(m.model, m.tokenizer))


def test_lm_eval_local_task_lora_adapter(tiny_base, task_dir, tmp_path):
    """A directory holding only a LoRA adapter (as `llm sft --lora --no-merge` writes under adapter/)."""
    from peft import LoraConfig, get_peft_model

    from lifecycle.modeling import load_causal_lm
    from lifecycle.tokenizer import load_tokenizer, save_tokenizer

    torch.manual_seed(3)
    peft_model = get_peft_model(load_causal_lm(str(tiny_base)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    d = tmp_path / "lora"
    peft_model.save_pretrained(d / "adapter")
    save_tokenizer(load_tokenizer(str(tiny_base)), d)
    acc, m = _harness_accuracy(str(d), task_dir)
    assert m.adapter == str(d / "adapter")
    merged = m.model.merge_and_unload()
    plain = load_causal_lm(str(tiny_base))
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight)
    assert acc == pytest.approx(hand_accuracy(merged, m.tokenizer))


def test_decontamination_flags_13_gram_overlap():
    train = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen", "what is 48 plus 87 ? it is 135 ."]
    items = ["x two three four five six seven eight nine ten eleven twelve thirteen fourteen y",  # shares a 13-gram
             "two three four five six seven eight nine ten eleven twelve thirteen x",  # 12 in a row only
             "What is 48 plus 87?",  # short: occurs whole (case and punctuation ignored)
             "what is 48 plus 88 ?"]
    assert ev.contaminated(items, train) == [True, False, True, False]


# ---------------------------------------------------------------------------
# 5. A whole lifecycle directory
# ---------------------------------------------------------------------------
def _copy_artifact(src: Path, dst: Path, parent: Path | None, stage: str) -> None:
    shutil.copytree(src, dst)
    m = json.loads((dst / "lifecycle.json").read_text())
    m.update(stage=stage, parent={"path": str(parent.resolve()), "digest": None, "stage": None} if parent else None)
    (dst / "lifecycle.json").write_text(json.dumps(m))


def test_lifecycle_table_and_plot(tiny_base, reward_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _copy_artifact(tiny_base, run / "pretrain", None, "pretrain")
    _copy_artifact(tiny_base, run / "sft", run / "pretrain", "sft")
    shutil.copytree(reward_dir, run / "reward")
    out = tmp_path / "ev"
    ev.run(cfg(lifecycle=str(run), out=str(out), problems=10, docs=3))
    res = json.loads((out / "eval.json").read_text())
    assert list(res["models"]) == ["pretrain", "sft"]
    assert res["models"]["sft"]["win_rate"]["vs"] == "pretrain" and "win_rate" not in res["models"]["pretrain"]
    assert res["models"]["sft"]["win_rate"]["reward"]["win_rate"] == 0.5  # same weights: every prompt a tie
    report = (out / "report.md").read_text()
    assert "| metric | pretrain | sft |" in report and "metrics across stages" in report
    assert (out / "plots" / "metrics.png").is_file()


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------
def llm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifecycle", "eval", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_not_a_causal_lm(reward_dir, tmp_path):
    _one_error_line(llm("--model", str(reward_dir), "--out", str(tmp_path / "o")), "reward-model", "causal-lm")
    assert not (tmp_path / "o").exists()


def test_bad_input_unknown_and_hub_tasks_offline(tiny_base, task_dir, tmp_path, monkeypatch):
    """Checked before any model loads (in process: the CLI turns this UsageError into one line and exit 2, as above)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for tasks, needles in ((["no_such_task_xyz"], ("unknown lm-eval task", "no_such_task_xyz")),
                           (["sums_local,hellaswag"], ("offline", "hellaswag"))):
        with pytest.raises(UsageError) as e:
            ev.run(cfg(model=str(tiny_base), out=str(tmp_path / "o"), tasks=tasks, task_dir=str(task_dir)))
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles) and "sums_local" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_bad_input_vs_without_common_prompts(tiny_base, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, rows in ((a, ["what is 1 plus 2 ?", "what is 3 plus 4 ?"]), (b, ["tell me a joke", "write a poem"])):
        shutil.copytree(tiny_base, d)
        (tmp_path / f"{d.name}.jsonl").write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
        m = json.loads((d / "lifecycle.json").read_text())
        m["config"] = {"prompts": str(tmp_path / f"{d.name}.jsonl"), "eval_prompts": 1}
        (d / "lifecycle.json").write_text(json.dumps(m))
    _one_error_line(llm("--model", str(a), "--vs", str(b), "--out", str(tmp_path / "o"), "--no-decontaminate"),
                    "none in common", "--prompts")


def test_bad_config_reported_together():
    with pytest.raises(UsageError) as e:
        cfg(out="", temperature=-1.0, problems=900)
    msg = str(e.value)
    assert "--out is required" in msg and "--model DIR" in msg and "--temperature" in msg and "--problems 900" in msg


def test_verify_refuses_a_corrupted_model_before_loading_it(tiny_base, tmp_path):
    """--verify: a weights file of the right size whose bytes changed is caught by its manifest's sha256,
    in one UsageError naming the file, before anything loads or OUT is written."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    w = bad / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    w.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"model\.safetensors's content does not match its checksum"):
        ev.run(cfg(model=str(bad), out=str(tmp_path / "o"), verify=True))
    assert not (tmp_path / "o").exists()
    ev.verify_specs([ev.check_model(str(tiny_base), "--model", "base")])  # an intact artifact passes
