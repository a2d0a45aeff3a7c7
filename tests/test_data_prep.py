"""`llm data`: each step on hand-checked cases, and the whole pipeline on a planted corpus.

The planted corpus (built below, offline) holds clean documents plus exact duplicates, near duplicates
(3 words changed), low-quality documents, documents with PII, documents holding evaluation items
(reflowed across lines, re-cased and re-punctuated) and built-in-world held-out problems, in sources of
known sizes. The pipeline must remove or scrub every planted item (near duplicates: at least 90%), keep
every clean document, and draw the mixture to the weights within 1%.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lifecycle.config import DataConfig, build_config
from lifecycle.data.prep import steps as S
from lifecycle.data.prep import text as T
from lifecycle.data.prep.pipeline import draw, quotas
from lifecycle.data.prep.sources import parse_source
from lifecycle.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Per-document functions, checked by hand
# ---------------------------------------------------------------------------
def test_normalize_unicode_and_whitespace():
    assert T.normalize("Cafe\u0301  au\tlait \r\n\r\n\n  next\x00line  ") == "Café au lait\n\nnext line"
    assert T.normalize("ﬁne") == "ﬁne" and T.normalize("ﬁne", "NFKC") == "fine"  # the ligature folds only under NFKC
    assert T.text_hash(T.normalize("a  b\n")) == T.text_hash("a b")


def test_luhn_and_pii_placeholders():
    assert T.luhn_ok("4111111111111111") and T.luhn_ok("79927398713") and not T.luhn_ok("4111111111111112")
    text = ("Mail jane.doe+x@mail.example.org or call (415) 555-0132 / +44 20 7946 0958; server 192.168.0.17 and "
            "2001:db8::8a2e:370:7334; card 4111 1111 1111 1111, not 4111 1111 1111 1112; version 1.2.3 and 48 plus 87.")
    out, counts = T.scrub_pii(text)
    assert out == ("Mail <EMAIL> or call <PHONE> / <PHONE>; server <IP_ADDRESS> and <IP_ADDRESS>; card <CREDIT_CARD>, "
                   "not 4111 1111 1111 1112; version 1.2.3 and 48 plus 87.")
    assert counts == {"email": 1, "phone": 2, "ip": 2, "credit_card": 1}


def test_gopher_rules_each_fire_on_their_case():
    from lifecycle.config import DataConfig
    from lifecycle.data.prep.pipeline import gopher_rules

    rules = gopher_rules(DataConfig())  # the paper's thresholds, DataConfig's defaults
    filler = ("the river and the garden of stone have music with paper that travels to a bright market "
              "where morning light falls on ancient windows and silver boats drift past the old harbour walls ")
    clean = (filler * 3).strip()
    clean = " ".join(f"{w}{i}" if i % 3 else w for i, w in enumerate(clean.split()))  # no repeated n-grams
    assert T.gopher_reasons(clean, rules) == []
    assert "word_count" in T.gopher_reasons("the cat and the dog", rules)
    assert "symbol_word_ratio" in T.gopher_reasons(clean + " #" * 20, rules)
    bullets = "\n".join(f"- item {w} of the list" for w in clean.split()[:60])
    assert "bullet_lines" in T.gopher_reasons(bullets, rules)
    assert "ellipsis_lines" in T.gopher_reasons("\n".join(f"{w} and the rest ..." for w in clean.split()[:60]), rules)
    assert "alpha_words" in T.gopher_reasons(clean + " " + " ".join(str(i) for i in range(40)), rules)
    no_stop = " ".join(w for w in clean.split() if w not in T.STOP_WORDS)
    assert "stop_words" in T.gopher_reasons(no_stop, rules)
    assert "duplicate_lines" in T.gopher_reasons("\n".join([clean] + ["the same line of text again"] * 5), rules)
    # 10 copies of one 10-word sentence: the top 2-gram's characters are a large share.
    assert "top_ngram" in T.gopher_reasons(" ".join(["the cat sat on the mat with a hat and"] * 10), rules)


def test_repetition_fractions_by_hand():
    words = "a bb a bb ccc".split()  # 9 characters
    assert T.top_ngram_char_fraction(words, 2) == pytest.approx(2 * 3 / 9)  # "a bb" twice
    assert T.dup_ngram_char_fraction(words, 2) == pytest.approx(6 / 9)  # words 0-3 covered, "ccc" not
    assert T.dup_ngram_char_fraction(words, 3) == 0.0


def test_decontamination_matches_across_line_breaks_case_and_punctuation():
    item = "Which planet in our solar system has the longest day of all the eight known planets?"
    index, skipped = S.decontam_index([("q1", item), ("short", "yes no")], n=13, min_words=5)
    assert skipped == 1 and set(index) == {13}
    reflowed = "Trivia night.\nWHICH planet in our solar\nsystem has the LONGEST day, of all the eight known planets!"
    assert S.contamination(reflowed, index)[0] == "q1"
    assert S.contamination("which planet in our solar system has the longest night of all", index) is None
    world, _ = S.decontam_index([("w", "48 plus 87 equals 135 .")], n=13, min_words=5)
    assert S.contamination("so 48\nplus 87 equals 135. right", world)[0] == "w"  # shorter than 13: whole item
    assert S.contamination("48 plus 87 equals 136 .", world) is None
    assert S.contamination("48 plus 87 equals 135 .", world)[0] == "w"  # an overlap that ends the document
    assert S.contamination("the trivia question was: " + item.lower(), index)[0] == "q1"  # the last 13-gram


def test_source_specs():
    assert parse_source("web=a/b.jsonl:0.7") == ("web", "a/b.jsonl", 0.7)
    assert parse_source("web=a/b.jsonl") == ("web", "a/b.jsonl", None)
    assert parse_source("a/books.jsonl.gz") == ("books", "a/books.jsonl.gz", None)
    with pytest.raises(UsageError, match="not a number"):
        parse_source("web=a.jsonl:lots")
    with pytest.raises(UsageError, match="positive"):
        parse_source("web=a.jsonl:-1")


def test_quotas_and_draw_by_hand():
    assert quotas({"a": 1000, "b": 100}, {"a": 1, "b": 1}, 0) == {"a": 100, "b": 100}  # b is scarce: taken whole
    assert quotas({"a": 1000, "b": 100}, {"a": 3, "b": 1}, 800) == {"a": 600, "b": 200}
    tokens = [10, 20, 30]
    assert draw(tokens, 60, random.Random(0)) == [1, 1, 1]
    assert draw(tokens, 150, random.Random(0)) == [2, 2, 2] or sum(t * n for t, n in zip(tokens, draw(tokens, 150, random.Random(0)))) == 150
    n = draw(tokens, 135, random.Random(0))  # 2 passes (120) + 15 more: only the 10 fits
    assert n == [3, 2, 2]
    assert draw([5] * 100, 250, random.Random(1)) != draw([5] * 100, 250, random.Random(2))  # another seed, another sample
    assert sum(draw([5] * 100, 250, random.Random(1))) == 50


# ---------------------------------------------------------------------------
# The planted corpus
# ---------------------------------------------------------------------------
STOPS = ("the", "of", "and", "to", "with", "that")


def _vocab(rng: random.Random, n: int = 4000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _clean(rng: random.Random, vocab: list[str]) -> str:
    """100-160 words of pseudo-English: a quarter stop words, a full stop every 12 words."""
    words = [rng.choice(STOPS) if rng.random() < 0.25 else rng.choice(vocab) for _ in range(rng.randint(100, 160))]
    return " ".join(w + ("." if i % 12 == 11 else "") for i, w in enumerate(words)) + "."


def _low_quality(rng: random.Random, vocab: list[str]) -> list[tuple[str, str]]:
    """(text, the Gopher rule it breaks), each from its own words (so they are not near duplicates of each other)."""
    c = [_clean(rng, vocab).split() for _ in range(9)]
    return [
        (" ".join(c[0][:30]), "word_count"),
        (" ".join(w + " #" for w in c[1]), "symbol_word_ratio"),
        ("\n".join("• " + " ".join(c[2][i:i + 4]) for i in range(0, 100, 4)), "bullet_lines"),
        ("\n".join(" ".join(c[3][i:i + 6]) + " ..." for i in range(0, 96, 6)), "ellipsis_lines"),
        (" ".join(f"{w} {rng.randint(0, 9999)} {rng.randint(0, 99)} {rng.randint(0, 9)}" for w in c[4][:40]), "alpha_words"),
        (" ".join(w for w in c[5] if w.strip(".") not in STOPS), "stop_words"),
        ("\n".join([" ".join(c[6][:60])] + ["click here to subscribe to the newsletter"] * 8), "duplicate_lines"),
        (" ".join(["buy the best shoes at the lowest price today"] * 12), "top_ngram"),
        (" ".join(["x" * 14 + w for w in c[8]]), "mean_word_length"),
    ]


PII = ["reach me at maria.lopez@example.com today", "call 555-867-5309 after noon", "the host 10.0.12.7 was down",
       "ping fe80::1ff:fe23:4567:890a for status", "card 4539 1488 0343 6467 was charged", "phone +49 30 901820 77",
       "write to ops-team@corp.example.net", "card 5555555555554444 expired", "desk (212) 555-0199 ext",
       "gateway 172.16.254.1 responds"]
SECRETS = ["maria.lopez@example.com", "555-867-5309", "10.0.12.7", "fe80::1ff:fe23:4567:890a", "4539 1488 0343 6467",
           "+49 30 901820 77", "ops-team@corp.example.net", "5555555555554444", "(212) 555-0199", "172.16.254.1"]


def _reflow(text: str, rng: random.Random) -> str:
    """The same words with line breaks in new places, another case, other punctuation."""
    words = [w.strip("?.,!") for w in text.split()]
    return "".join(w.upper() if i % 3 == 0 else w for i, w in enumerate(" ".join(words))) if False else \
        "\n".join(" ".join(words[i:i + 4]) for i in range(0, len(words), 4)).upper() + "!"


def make_corpus(d: Path) -> dict:
    """Three sources (jsonl.gz, parquet, zstd jsonl) and an eval set; returns the planted ids by category."""
    import pyarrow as pa
    import zstandard

    from lifecycle.data import world

    rng = random.Random(17)
    vocab = _vocab(rng)
    eval_items = [{"question": " ".join(rng.choice(vocab) for _ in range(18)) + "?", "answer": rng.choice(vocab)} for _ in range(12)]
    books = [_clean(rng, vocab) for _ in range(60)]
    code = [_clean(rng, vocab) for _ in range(40)]
    web: list[str] = []
    ids = {k: [] for k in ("clean", "exact", "near", "low", "pii", "contaminated")}
    ids["clean"] += [f"books:{i}" for i in range(len(books))]

    def add(src: list, name: str, text: str, kind: str) -> None:
        ids[kind].append(f"{name}:{len(src)}")
        src.append(text)

    for _ in range(120):
        add(web, "web", _clean(rng, vocab), "clean")
    for i in range(15):  # copies of books documents, with other whitespace and an NFD accent
        add(web, "web", "  " + books[i].replace(" ", "   ", 3) + "\n\n", "exact")
    for i in range(5):  # copies inside web itself
        add(web, "web", web[i], "exact")
    for i in range(60):  # 3 words changed
        w = web[20 + i].split()
        for k in rng.sample(range(len(w)), 3):
            w[k] = rng.choice(vocab)
        add(web, "web", " ".join(w), "near")
    lows = _low_quality(rng, vocab)
    for text, _ in lows:
        add(web, "web", text, "low")
    for p in PII:
        c = _clean(rng, vocab).split()
        add(web, "web", " ".join(c[:50] + p.split() + c[50:]), "pii")
    for i in range(len(code)):
        ids["clean"].append(f"code:{i}")
    for item in eval_items:  # an evaluation question, reflowed, inside an otherwise clean document
        c = _clean(rng, vocab)
        add(code, "code", c[:300] + "\n" + _reflow(item["question"], rng) + "\n" + c[300:], "contaminated")
    for p in world.heldout_problems()[:6]:  # built-in world held-out problems, in its own phrasing
        c = _clean(rng, vocab)
        add(code, "code", c + " " + random.Random(p.a).choice(world.TEMPLATES).format(a=p.a, b=p.b, c=p.answer), "contaminated")
    # A clean document that mentions a *training* problem of the world must stay.
    train_p = world.splits()[0][0]
    add(code, "code", _clean(rng, vocab) + f" {train_p.a} plus {train_p.b} equals {train_p.answer} .", "clean")

    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(d / "web.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in web)
    pq.write_table(pa.table({"text": books, "meta": list(range(len(books)))}), d / "books.parquet")
    (d / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in code).encode()))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_items))
    ids["low_reasons"] = [r for _, r in lows]
    return ids


def _run(d: Path, out: Path, **kw):
    from lifecycle.stages import data

    base = {"out": str(out), "source": [f"books={d / 'books.parquet'}", f"web={d / 'web.jsonl.gz'}", f"code={d / 'code.jsonl.zst'}"],
            "eval_set": [str(d / "eval.jsonl")], "shard_size": 64}
    base.update(kw)
    t0 = time.perf_counter()
    data.run(build_config(DataConfig, None, base))
    return time.perf_counter() - t0, json.loads((out / "data.json").read_text())


def _output(out: Path) -> list[dict]:
    m = json.loads((out / "data.json").read_text())
    return [r for s in m["shards"] for r in pq.read_table(out / s).to_pylist()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    ids = make_corpus(d / "in")
    cold, manifest = _run(d / "in", d / "out")
    return d, ids, manifest, cold


def test_planted_items_are_removed_or_scrubbed_and_clean_documents_kept(planted):
    d, ids, manifest, _ = planted
    out = d / "out"
    removed = {r["id"]: r for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}
    kept = {r["id"]: r for r in _output(out)}
    by_step = lambda kind, step: [i for i in ids[kind] if removed.get(i, {}).get("step") == step]
    assert by_step("exact", "exact_dedup") == ids["exact"]                         # 100%
    near = by_step("near", "near_dedup")
    assert len(near) / len(ids["near"]) >= 0.9, (len(near), len(ids["near"]))     # >= 90% at the default threshold
    assert by_step("low", "quality") == ids["low"]
    assert all(why in removed[i]["rules"] for i, why in zip(ids["low"], ids["low_reasons"]))  # for the rule it breaks
    assert by_step("contaminated", "decontaminate") == ids["contaminated"]        # 100%, reflowed or not
    assert all(removed[i]["item"].startswith("world:") for i in ids["contaminated"][-6:])
    clean = ids["clean"] + ids["pii"]
    assert [i for i in clean if i not in kept] == []                               # no clean document removed
    assert len(kept) == len(clean) + len(ids["near"]) - len(near)
    # PII: every planted secret is gone, each replaced by its placeholder.
    pii_text = " ".join(kept[i]["text"] for i in ids["pii"])
    assert [s for s in SECRETS if s in pii_text] == []
    pii = next(s for s in manifest["steps"] if s["step"] == "pii")
    assert pii["replaced"] == {"email": 2, "phone": 3, "ip": 3, "credit_card": 2} and pii["docs_scrubbed"] == 10
    assert pii_text.count("<EMAIL>") == 2 and pii_text.count("<CREDIT_CARD>") == 2 and pii_text.count("<IP_ADDRESS>") == 3
    # The manifest: inputs with digests, per-step counts, the config; the report has a table per step.
    assert [i["name"] for i in manifest["inputs"]] == ["books", "web", "code"]
    assert all(len(f["sha256"]) == 64 for i in manifest["inputs"] for f in i["files"])
    assert [s["step"] for s in manifest["steps"]] == ["read", "exact_dedup", "near_dedup", "quality", "pii", "decontaminate", "mix"]
    assert manifest["config"]["minhash_threshold"] == 0.6
    report = (out / "report.md").read_text()
    assert "| near_dedup | on |" in report and "### decontaminate" in report
    if manifest["plots"]:
        assert (out / "plots/lengths.png").stat().st_size > 1000


def test_warm_cache_rerun_is_identical_and_fast(planted):
    d, _, first, cold = planted
    before = {p.name: p.read_bytes() for p in (d / "out/shards").iterdir()}
    warm, again = _run(d / "in", d / "out")
    assert all(s["cached"] for s in again["steps"] if s["enabled"])
    assert {p.name: p.read_bytes() for p in (d / "out/shards").iterdir()} == before
    assert again["tokens"] == first["tokens"]
    print(f"cold {cold:.2f} s, warm {warm:.2f} s")
    assert warm < 0.5 * cold, (warm, cold)


def test_mixture_meets_the_weights_within_one_percent(planted):
    d, _, _, _ = planted
    target = 80_000  # words; web 2 : books 1 : code 1, so books and code are repeated, web too
    _, m = _run(d / "in", d / "out", source=[f"books={d / 'in/books.parquet'}:1", f"web={d / 'in/web.jsonl.gz'}:2",
                                             f"code={d / 'in/code.jsonl.zst'}:1"], target_tokens=target, seed=3)
    assert [s["cached"] for s in m["steps"] if s["enabled"]] == [True] * 6 + [False]  # only the mixture is new
    counted = {"web": 0, "books": 0, "code": 0}
    for r in _output(d / "out"):
        counted[r["source"]] += len(r["text"].split())
    assert counted == m["tokens"]  # the report's counts are exact
    for name, share in (("web", 0.5), ("books", 0.25), ("code", 0.25)):
        assert abs(counted[name] - share * target) <= 0.01 * share * target, (name, counted)
    # Another seed is another draw: the mixture is redone (not taken from the cache) and samples other documents.
    first = sorted(r["id"] for r in _output(d / "out"))
    _, m2 = _run(d / "in", d / "out", source=m["config"]["source"], target_tokens=target, seed=4)
    assert [s["cached"] for s in m2["steps"] if s["enabled"]] == [True] * 6 + [False]
    assert sorted(r["id"] for r in _output(d / "out")) != first


def test_any_number_of_workers_gives_the_same_corpus(planted, tmp_path):
    """Shards are processed independently, so a pool (or a cluster executor) of any size writes the same output."""
    d, _, first, _ = planted
    _, m = _run(d / "in", tmp_path / "out", num_proc=2, shard_size=40, cache_dir="none")
    _, m1 = _run(d / "in", tmp_path / "out1", num_proc=1, shard_size=40, cache_dir="none")
    assert _output(tmp_path / "out") == _output(tmp_path / "out1")
    assert m["tokens"] == m1["tokens"] == first["tokens"]
    assert not (tmp_path / "out/.cache").exists()


# ---------------------------------------------------------------------------
# The built-in world: held-out problems planted into a pretraining corpus come out removed
# ---------------------------------------------------------------------------
def test_world_corpus_is_decontaminated_and_pretrain_trains_on_it(tmp_path):
    from lifecycle.config import PretrainConfig
    from lifecycle.data import world
    from lifecycle.data.files import text_documents
    from lifecycle.stages import data, pretrain

    docs = world.pretrain_documents(400, seed=5)
    planted = world.heldout_documents(12)
    planted = [p.replace(" . ", " .\n", 2) for p in planted]  # reflowed over lines
    rows = docs[:200] + planted + docs[200:]
    (tmp_path / "world.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "corpus"
    cfg = build_config(DataConfig, str(ROOT / "recipes/default/data.yaml"),
                       {"out": str(out), "source": [f"world={tmp_path / 'world.jsonl'}"]})
    data.run(cfg)
    kept = text_documents([str(out)])
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in removed if r["step"] == "decontaminate") == [f"world:{200 + i}" for i in range(12)]
    assert len(kept) == len(set(docs)) and not (set(kept) & {" ".join(p.split()) for p in planted})
    heldout = {(p.a, p.b) for p in world.heldout_problems()}
    assert not any(p in heldout for t in kept for p in map(lambda m: (int(m[0]), int(m[1])),
                                                            __import__("re").findall(r"(\d+) plus (\d+)", t)))
    model = tmp_path / "base"
    pretrain.run(build_config(PretrainConfig, None, dict(
        out=str(model), data=[str(out)], model="llama-micro", seq_len=32, batch_size=8, steps=3, warmup_steps=1,
        eval_every=3, eval_batches=1, log_every=1, vocab_size=300, save_every=0)))
    assert (model / "model.safetensors").is_file()


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing half-written in --out
# ---------------------------------------------------------------------------
def llm(*args):
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, timeout=120)


def one_line_error(r, *needles):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_exit_2_and_leave_out_clean(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a document"}) + "\n")
    out = tmp_path / "out"
    one_line_error(llm("data", "--source", f"a={tmp_path / 'missing.jsonl'}", "--out", str(out)), "not found")
    one_line_error(llm("data", "--source", f"a={good}:heavy", "--out", str(out)), "'heavy' is not a number")
    (tmp_path / "eval.xml").write_text("<items/>")
    one_line_error(llm("data", "--source", f"a={good}", "--eval-set", str(tmp_path / "eval.xml"), "--out", str(out)),
                   "unknown format .xml")
    one_line_error(llm("data", "--out", str(out)), "no --source")
    assert not out.exists()
    # A bad row deep in a file is found while reading: the run stops and --out is removed again.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    one_line_error(llm("data", "--source", f"a={good}", "--source", f"b={bad}", "--out", str(out)), "line 2 is not valid JSON")
    assert not out.exists()
    # Over an earlier corpus, a failed run leaves that corpus as it was.
    assert llm("data", "--source", f"a={good}", "--no-quality", "--out", str(out)).returncode == 0
    before = (out / "data.json").read_bytes()
    one_line_error(llm("data", "--source", f"b={bad}", "--out", str(out)), "not valid JSON")
    assert (out / "data.json").read_bytes() == before and not list(out.glob(".staging-*"))


def test_compressed_jsonl_and_corpus_directories_are_readable(tmp_path):
    from lifecycle.data.files import read_records

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert [r["text"] for r in read_records(str(tmp_path / "a.jsonl.gz"))] == ["one", "two"]
    assert [r["text"] for r in read_records(str(tmp_path))] == ["one", "two"]  # a plain directory of data files
    (tmp_path / "data.json").write_text(json.dumps({"shards": ["a.jsonl.gz"], "files": {"a.jsonl.gz": 1}}))
    with pytest.raises(UsageError, match="incomplete"):  # a corpus whose shard has the wrong size is refused
        read_records(str(tmp_path))
