"""`llm eval`: how good a model is, against its parent, on held-out text, the built-in world and benchmarks.

What it measures, in order (each part is skipped when its inputs are absent):

1. Language modelling: bits per byte and perplexity on held-out text (`--data`
   files, else the built-in world's held-out documents). Bits per byte divides
   the total negative log-likelihood by the text's UTF-8 bytes, not its tokens,
   so models with different tokenizers compare:
       bpb = Σ nats / (ln 2 · Σ bytes),   perplexity = exp(Σ nats / Σ tokens).
   Each document is read after one start token (BOS, else EOS: how `llm
   pretrain` separates documents), so its first token is predicted too; a
   document longer than the window is cut into windows that overlap by one
   token, so every token is predicted exactly once.
2. The built-in world: gold accuracy (overall, carry, no-carry) of greedy answers
   to its held-out problems (`generate.gold_accuracy`, the number the stages record).
3. Win rate against `--vs`: both models answer the same held-out prompts; the
   reward model scores both answers, and the model wins a prompt when its answer
   scores higher (ties count half). The gold win rate counts a prompt won when
   only the model's answer is right (ties, both right or both wrong, count half).
   Each comes with a 95% percentile-bootstrap interval over prompts.
4. lm-evaluation-harness tasks (`--tasks`, local tasks from `--task-dir`) through
   its Python API on the loaded model (plain or LoRA adapter): the harness's own
   metrics; we write no harness of our own.
5. Decontamination: the share of evaluation items (held-out documents, prompts,
   local task items) whose 13-grams occur in the training data named in the
   manifests' configs.
6. `--lifecycle DIR`: every causal-LM stage of a `llm run` directory on the same
   items, one table and one plot; each stage's win rate is against its parent.

Output: OUT/eval.json, OUT/report.md, OUT/plots/*.png, OUT/samples.jsonl, each
written atomically (temporary file, then rename; eval.json last).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lifecycle import artifacts
from lifecycle.artifacts import CAUSAL_LM, REWARD_MODEL, check_artifact
from lifecycle.config import EvalConfig, check_config
from lifecycle.data import world
from lifecycle.data.prompts import as_user_turns, check_prompt
from lifecycle.errors import UsageError
from lifecycle.evaluation import Loaded
from lifecycle.evaluation.contamination import contaminated, decontamination  # noqa: F401  (contaminated: re-exported)
from lifecycle.evaluation.harness import harness, task_items, task_manager  # noqa: F401
from lifecycle.evaluation.report import write_outputs
from lifecycle.generate import Sample, generate_batch, render_prompts
from lifecycle.modeling import context_length, load_causal_lm
from lifecycle.reward_model import load_reward_model, score
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import format_eta, quiet, say

LIFECYCLE_ORDER = ["pretrain", "sft", "ppo", "grpo", "dpo"]  # causal-LM stages, in the order a run makes them
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------
# Loading a model: a causal-LM artifact, or a directory holding a LoRA adapter
# ---------------------------------------------------------------------------
def adapter_dir(path: Path) -> Path | None:
    """The LoRA adapter a directory holds instead of a full model: DIR itself, or DIR/adapter of `llm sft --no-merge`."""
    for d in (path, path / "adapter"):
        if (d / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return d
    return None


def load_model(path: str, flag: str, name: str | None = None) -> Loaded:
    """Check then load a causal LM (UsageError, one line, when `path` is not one)."""
    p = Path(path).expanduser()
    ad = adapter_dir(p) if p.is_dir() else None
    if ad is None:
        art = check_artifact(path, CAUSAL_LM, flag)
        model = load_causal_lm(art.path)
        tok = load_tokenizer(art.path)
        return Loaded(name or p.name, art.path, model.eval(), tok, art.manifest)
    from peft import PeftModel

    cfg = json.loads((ad / "adapter_config.json").read_text(encoding="utf-8"))
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UsageError(f"{flag} {path} holds a {task} adapter, but a causal-LM adapter is expected; pass an `llm sft --lora` output")
    manifest = artifacts.read_manifest(p)
    base = cfg.get("base_model_name_or_path") or ""
    if not Path(base).is_dir() and manifest and (manifest.get("parent") or {}).get("path"):
        base = manifest["parent"]["path"]
    base_art = check_artifact(base, CAUSAL_LM, f"{flag} {path}'s adapter base") if base else None
    if base_art is None:
        raise UsageError(f"{flag} {path}: adapter_config.json names no base model; set base_model_name_or_path to the base's directory")
    model = PeftModel.from_pretrained(load_causal_lm(base_art.path), str(ad))
    tok_dir = p if (p / "tokenizer_config.json").is_file() else (ad if (ad / "tokenizer_config.json").is_file() else Path(base_art.path))
    return Loaded(name or p.name, str(p), model.eval(), load_tokenizer(str(tok_dir)), manifest, adapter=str(ad))


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------
# 1. Bits per byte and perplexity
# ---------------------------------------------------------------------------
def start_token(tokenizer) -> int:
    """The token a document is read after: BOS where the tokenizer has one, else EOS (our pretraining's separator)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def windows(ids: list[int], start: int, seq_len: int) -> list[list[int]]:
    """[start] + ids cut into windows of at most `seq_len` tokens overlapping by one: each window predicts its
    tokens after the first, so every id is predicted exactly once (the first one after `start`)."""
    full = [start] + list(ids)
    step = seq_len - 1
    return [full[s : s + seq_len] for s in range(0, len(full) - 1, step)]


@torch.no_grad()
def document_nats(model, tokenizer, docs: list[str], *, seq_len: int, batch_size: int, label: str = "") -> list[tuple[float, int, int]]:
    """(nats, tokens, UTF-8 bytes) of each document: -Σ log p(token | everything before it in its window)."""
    device = next(model.parameters()).device
    items = []  # (doc index, window ids)
    counts = []
    for i, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        counts.append((len(ids), len(doc.encode("utf-8"))))
        items += [(i, w) for w in windows(ids, start_token(tokenizer), seq_len)]
    nats = [0.0] * len(docs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda k: -len(items[k][1]))  # similar lengths together: less padding
    t0, last = time.time(), time.time()
    for b in range(0, len(order), batch_size):
        chunk = [items[k] for k in order[b : b + batch_size]]
        T = max(len(w) for _, w in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].double(), -1)  # (B, T-1, V) log p(next | prefix)
        tok = torch.gather(logp, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        per_row = -(tok * mask[:, 1:]).sum(-1)  # (B,) nats of each window's predicted tokens
        for (i, _), v in zip(chunk, per_row.tolist()):
            nats[i] += v
        done = min(b + batch_size, len(order))
        if time.time() - last > 10 and done < len(order):
            last = time.time()
            say(f"eval{label}: bits per byte {done}/{len(order)} windows, eta {format_eta((time.time() - t0) / done * (len(order) - done))}")
    return [(n, t, by) for n, (t, by) in zip(nats, counts)]


def bits_per_byte(per_doc: list[tuple[float, int, int]]) -> dict:
    """Totals and the two ratios: bpb = Σ nats / (ln 2 · Σ bytes); perplexity = exp(Σ nats / Σ tokens)."""
    nats = sum(n for n, _, _ in per_doc)
    tokens = sum(t for _, t, _ in per_doc)
    nbytes = sum(b for _, _, b in per_doc)
    if not tokens or not nbytes:
        raise UsageError("the held-out text has no tokens; pass --data files with some text in them")
    return {"bits_per_byte": nats / (math.log(2) * nbytes), "perplexity": math.exp(nats / tokens),
            "nats": nats, "tokens": tokens, "bytes": nbytes, "documents": len(per_doc)}


def language_modelling(m: Loaded, docs: list[str], cfg: EvalConfig) -> dict:
    ctx = context_length(getattr(m.model, "config"))
    seq_len = cfg.seq_len or min(ctx, 2048)
    if seq_len > ctx:
        raise UsageError(f"--seq-len {seq_len} is longer than {m.name}'s context ({ctx}); use at most {ctx}")
    return bits_per_byte(document_nats(m.model, m.tokenizer, docs, seq_len=seq_len, batch_size=cfg.batch_size, label=f" {m.name}"))


def held_out_text(cfg: EvalConfig) -> tuple[list[str], str]:
    if cfg.data:
        from lifecycle.data.files import text_documents

        docs = text_documents(list(cfg.data), cfg.text_column)
        return docs, f"{len(docs)} documents from {', '.join(cfg.data)}"
    return world.heldout_documents(cfg.docs), f"built-in world: {cfg.docs} held-out documents"


# ---------------------------------------------------------------------------
# 2-3. Answers, gold accuracy, reward scores, win rates
# ---------------------------------------------------------------------------
@dataclass
class EvalPrompts:
    prompts: list  # each a list of chat messages
    problems: list | None  # world problems (gold checker) when every prompt is one
    about: str


def _prompt_file(path: str, column: str) -> list:
    from lifecycle.data.files import read_records

    rows = read_records(path, column)
    return [check_prompt(r, i, column, path) for i, r in enumerate(rows)]


def _recorded_prompts(manifest: dict | None) -> list | None:
    """The held-out prompts a PPO artifact was evaluated on (its recipe's prompt file), or None when it names none."""
    cfg = (manifest or {}).get("config") or {}
    if not cfg.get("prompts"):
        return None
    from lifecycle.data.prompts import load_prompts

    try:
        return load_prompts(cfg["prompts"], column=cfg.get("prompt_column", "prompt"), eval_prompts=cfg.get("eval_prompts", 500),
                            world_prompts=1, seed=cfg.get("seed", 0)).eval
    except UsageError:
        return None  # the recorded file has moved: fall back to the other model's or the world's


def _key(p) -> str:
    return json.dumps(p, sort_keys=True)


def eval_prompts(cfg: EvalConfig, models: list[Loaded]) -> EvalPrompts:
    """The prompts every model answers: --prompts, else the held-out prompts the models' recipes share, else the world's."""
    if cfg.prompts:
        prompts, about = _prompt_file(cfg.prompts, cfg.prompt_column), f"{cfg.prompts}"
    else:
        recorded = [(m, r) for m in models if (r := _recorded_prompts(m.manifest)) is not None]
        if recorded:
            keys = set.intersection(*({_key(p) for p in r} for _, r in recorded))
            prompts = [p for p in recorded[0][1] if _key(p) in keys]
            if not prompts:
                names = " and ".join(f"{m.name} ({(m.manifest['config'] or {}).get('prompts')})" for m, _ in recorded)
                raise UsageError(f"{names} were evaluated on held-out prompts with none in common; pass --prompts FILE to compare them on the same prompts")
            about = f"held-out prompts of {recorded[0][0].name}'s recipe"
        else:
            problems = world.heldout_problems(cfg.problems)
            return EvalPrompts([[world.user(p.question)] for p in problems], problems, f"built-in world: {len(problems)} held-out problems")
    prompts = as_user_turns(prompts)
    parsed = [world.parse_problem(" ".join(m["content"] for m in p)) for p in prompts]
    return EvalPrompts(prompts, parsed if all(parsed) else None, f"{about}: {len(prompts)} prompts")


def answer(m: Loaded, ep: EvalPrompts, cfg: EvalConfig) -> list[Sample]:
    if not getattr(m.tokenizer, "chat_template", None):
        raise UsageError(f"{m.name}'s tokenizer has no chat template, so it cannot answer prompts; evaluate it without --vs/--reward")
    n = cfg.max_new_tokens or (6 if ep.problems is not None else 64)
    say(f"eval: {m.name} answers {len(ep.prompts)} prompts")
    return generate_batch(m.model, m.tokenizer, render_prompts(m.tokenizer, ep.prompts), max_new_tokens=n,
                          temperature=cfg.temperature, batch_size=max(cfg.batch_size, 64), generator_seed=cfg.seed)


def gold(samples: list[Sample], problems: list) -> list[bool]:
    return [world.gold_check(p.question, s.text, s.ended) for p, s in zip(problems, samples)]


def gold_metrics(right: list[bool], problems: list) -> dict:
    """Gold accuracy overall, on carry and on no-carry problems (as `generate.gold_accuracy` reports it)."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"gold_accuracy": mean(right),
            "gold_accuracy_carry": mean([r for r, p in zip(right, problems) if p.has_carry]),
            "gold_accuracy_nocarry": mean([r for r, p in zip(right, problems) if not p.has_carry]),
            "n": len(right)}


def win_rate(outcomes: list[float], seed: int = 0) -> dict:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) with a 95% percentile-bootstrap interval over prompts."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        raise UsageError("no prompts to compare the two models on; pass --prompts FILE with at least one row")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(BOOTSTRAP, x.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"win_rate": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "wins": int((x == 1).sum()),
            "ties": int((x == 0.5).sum()), "losses": int((x == 0).sum()), "n": int(x.size)}


def compare(a: list[float], b: list[float]) -> list[float]:
    """Per-prompt outcome of a against b: 1 when a is higher, 0.5 when equal, 0 when lower."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def reward_scores(rm, rm_tok, ep: EvalPrompts, samples: list[Sample], cfg: EvalConfig) -> list[float]:
    return score(rm, rm_tok, ep.prompts, [s.text for s in samples], batch_size=cfg.batch_size)


# ---------------------------------------------------------------------------
# The command: check every input first, then load and evaluate one model at a time
# ---------------------------------------------------------------------------
@dataclass
class Spec:
    """A model to evaluate, checked but not loaded yet."""

    name: str
    path: str
    flag: str
    manifest: dict | None


def check_model(path: str, flag: str, name: str) -> Spec:
    """Is `path` a causal LM (or a causal-LM adapter)? UsageError in one line when not; loads no weights."""
    p = Path(path).expanduser()
    if p.is_dir() and adapter_dir(p) is not None:
        return Spec(name, str(p), flag, artifacts.read_manifest(p))
    art = check_artifact(path, CAUSAL_LM, flag)
    return Spec(name, art.path, flag, art.manifest)


def verify_specs(specs: list[Spec]) -> None:
    """--verify: every evaluated artifact's files against the sha256 its manifest records, before any loads.
    An adapter directory is checked against its own manifest (artifacts.require_checksums, as check_artifact does)."""
    for spec in specs:
        p = Path(spec.path)
        if adapter_dir(p) is None:
            check_artifact(spec.path, CAUSAL_LM, spec.flag, verify=True)
            continue
        artifacts.require_checksums(p, spec.manifest, f"{spec.flag} {spec.path}")


def run(cfg: EvalConfig) -> Path:
    """`llm eval`: the metrics of one model (and --vs), or of every stage of --lifecycle; returns OUT/eval.json."""
    check_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file; give a directory path")
    if cfg.lifecycle:
        specs, reward, parents = lifecycle_specs(cfg.lifecycle)
    else:
        specs = [check_model(cfg.model, "--model", Path(cfg.model).name or "model")]
        if cfg.vs:
            vs = check_model(cfg.vs, "--vs", Path(cfg.vs).name or "vs")
            vs.name = vs.name if vs.name != specs[0].name else vs.name + " (vs)"
            specs.append(vs)
        reward = cfg.reward or None
        parents = {specs[0].name: specs[1].name} if cfg.vs else {}
    if cfg.reward and cfg.lifecycle:
        reward = cfg.reward
    if cfg.verify:
        verify_specs(specs)
    rm = None
    if reward:
        art = check_artifact(reward, REWARD_MODEL, "--reward", verify=cfg.verify)
        rm = (load_reward_model(art.path), load_tokenizer(art.path))
    if cfg.tasks:
        check_tasks(cfg)  # an unknown or hub task fails here, before the long parts
    quiet()
    results = evaluate(specs, cfg, rm, parents)
    results["lifecycle"] = cfg.lifecycle or None
    results["reward_model"] = reward
    return write_outputs(out, results, cfg)


def lifecycle_specs(root: str) -> tuple[list[Spec], str | None, dict[str, str]]:
    """The causal-LM stages of a `llm run` directory in run order, its reward model, and each stage's parent in it."""
    d = Path(root)
    if not d.is_dir():
        raise UsageError(f"--lifecycle {root} is not a directory; pass a run directory written by `llm run` (e.g. runs/default)")
    found = {}
    for sub in sorted(x for x in d.iterdir() if x.is_dir()):
        m = artifacts.read_manifest(sub) if artifacts.is_complete(sub) else None
        if m and m.get("kind") in (CAUSAL_LM, REWARD_MODEL):
            found[sub.name] = (sub, m)
    stages = sorted((n for n, (_, m) in found.items() if m["kind"] == CAUSAL_LM),
                    key=lambda n: (LIFECYCLE_ORDER.index(n) if n in LIFECYCLE_ORDER else len(LIFECYCLE_ORDER), n))
    if not stages:
        raise UsageError(f"--lifecycle {root} holds no complete causal-LM stage (pretrain/, sft/, ppo/ ...); run `llm run --out {root}` first")
    specs = [check_model(str(found[n][0]), f"--lifecycle {root}: {n}", n) for n in stages]
    where = {str(found[n][0].resolve()): n for n in stages}
    parents = {}
    for n in stages:
        ppath = (found[n][1].get("parent") or {}).get("path")
        if ppath and str(Path(ppath).resolve()) in where:
            parents[n] = where[str(Path(ppath).resolve())]
    rewards = [n for n, (_, m) in found.items() if m["kind"] == REWARD_MODEL]
    return specs, (str(found[rewards[0]][0]) if rewards else None), parents


def check_tasks(cfg: EvalConfig) -> None:
    from lm_eval.tasks import TaskManager

    task_manager(cfg, TaskManager)


def evaluate(specs: list[Spec], cfg: EvalConfig, rm, parents: dict[str, str]) -> dict:
    """Every metric of every model on the same items; `parents` maps a model's name to the one it is compared with."""
    docs, docs_about = held_out_text(cfg)
    res: dict = {"models": {}, "items": {"text": docs_about}}
    world_problems = world.heldout_problems(cfg.problems) if cfg.world else None
    need_prompts = rm is not None or bool(parents) or bool(cfg.prompts)
    ep = eval_prompts(cfg, specs) if need_prompts else None
    answers, scores, rights = {}, {}, {}
    for k, spec in enumerate(specs):
        say(f"eval: [{k + 1}/{len(specs)}] {spec.name} ({spec.path})")
        m = load_model(spec.path, spec.flag, spec.name)
        m.model.to(_device())
        r: dict = {"path": m.path, "stage": (m.manifest or {}).get("stage"), "adapter": m.adapter}
        say(f"eval: {m.name}: bits per byte on {docs_about}")
        r["language_modelling"] = language_modelling(m, docs, cfg)
        if ep is not None:
            answers[m.name] = answer(m, ep, cfg)
            r["ended"] = float(np.mean([a.ended for a in answers[m.name]]))
            if ep.problems is not None:
                rights[m.name] = gold(answers[m.name], ep.problems)
        if world_problems is not None and getattr(m.tokenizer, "chat_template", None):
            same = ep is not None and ep.problems is not None and [p.question for p in ep.problems] == [p.question for p in world_problems]
            wp = EvalPrompts([[world.user(p.question)] for p in world_problems], world_problems, "world")
            ans = answers[m.name] if same else answer(m, wp, cfg)
            r["world"] = gold_metrics(gold(ans, world_problems), world_problems)
        if rm is not None:
            scores[m.name] = reward_scores(rm[0].to(_device()), rm[1], ep, answers[m.name], cfg)
            r["reward_score"] = float(np.mean(scores[m.name]))
        if cfg.tasks:
            r["benchmarks"] = harness(m, cfg)
        res["models"][m.name] = r
        del m
    for name, parent in parents.items():
        wr: dict = {"vs": parent, "prompts": ep.about, "ties": "count half"}
        if rm is not None:
            wr["reward"] = win_rate(compare(scores[name], scores[parent]), cfg.seed)
        if ep.problems is not None:
            wr["gold"] = win_rate(compare([float(x) for x in rights[name]], [float(x) for x in rights[parent]]), cfg.seed)
        res["models"][name]["win_rate"] = wr
    if ep is not None:
        res["items"]["prompts"] = ep.about
        res["samples"] = [{"prompt": p, **{n: {"answer": a[i].text, "ended": a[i].ended,
                                               **({"score": scores[n][i]} if n in scores else {}),
                                               **({"gold": rights[n][i]} if n in rights else {})}
                                           for n, a in answers.items()}} for i, p in enumerate(ep.prompts)]
    sets = {"text": docs}
    if ep is not None:
        sets["prompts"] = [" ".join(mm["content"] for mm in p) for p in ep.prompts]
    elif world_problems is not None:
        sets["world problems"] = [p.question for p in world_problems]
    sets["tasks"] = task_items(cfg)
    if cfg.decontaminate:
        say("eval: decontamination (13-gram overlap with the training data the manifests name)")
        res["decontamination"] = decontamination([s.manifest for s in specs], sets)
    return res


