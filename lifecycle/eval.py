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
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifecycle import artifacts
from lifecycle.artifacts import CAUSAL_LM, REWARD_MODEL, atomic_write_json, atomic_write_text, check_artifact
from lifecycle.config import EvalConfig, check_config
from lifecycle.data import world
from lifecycle.data.prompts import as_user_turns, check_prompt
from lifecycle.errors import UsageError
from lifecycle.generate import Sample, generate_batch, render_prompts
from lifecycle.modeling import context_length, load_causal_lm
from lifecycle.reward_model import load_reward_model, score
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import format_eta, quiet, say

LIFECYCLE_ORDER = ["pretrain", "sft", "ppo", "grpo", "dpo"]  # causal-LM stages, in the order a run makes them
NGRAM = 13
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------
# Loading a model: a causal-LM artifact, or a directory holding a LoRA adapter
# ---------------------------------------------------------------------------
@dataclass
class Loaded:
    name: str  # what the report calls it
    path: str
    model: Any
    tokenizer: Any
    manifest: dict | None
    adapter: str | None = None  # the adapter directory when the model is base + LoRA


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
# 4. lm-evaluation-harness
# ---------------------------------------------------------------------------
def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_local_dataset(task_cfg: dict) -> bool:
    """A task whose data is on this machine: a file builder (json/csv/...) over local files, or a local directory."""
    path = str(task_cfg.get("dataset_path") or "")
    if path in ("json", "csv", "parquet", "text", "arrow"):
        return True
    return bool(path) and Path(path).expanduser().exists()


def task_manager(cfg: EvalConfig, TaskManager) -> tuple[Any, list[str]]:
    """lm-eval's task index (with --task-dir) and the task names, after checking each is known and, offline, local."""
    tasks = [t for t in cfg.tasks for t in t.split(",") if t]
    if cfg.task_dir and not Path(cfg.task_dir).is_dir():
        raise UsageError(f"--task-dir {cfg.task_dir} is not a directory; pass the directory holding your task YAML files")
    tm = TaskManager(include_path=cfg.task_dir or None)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in --task-dir {cfg.task_dir}" if cfg.task_dir else "; add --task-dir DIR for tasks of your own"
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's {len(known)} tasks{where}")
    if _hub_offline():
        remote = []
        for t in tasks:
            entry = tm.task_index.get(t)
            kind = getattr(getattr(entry, "kind", None), "name", "")
            if kind != "TASK" or not _is_local_dataset(getattr(entry, "cfg", None) or {}):
                remote.append(t)  # a group or tag (its members fetch their own data), or a task over a hub dataset
        if remote:
            raise UsageError(f"lm-eval task(s) {', '.join(remote)} download their datasets from the Hugging Face Hub, and "
                             f"this machine is offline (HF_HUB_OFFLINE); run online, or use a local task with --task-dir")
    return tm, tasks


def harness(m: Loaded, cfg: EvalConfig) -> dict:
    """Run lm-eval's tasks on the loaded model; {task: {metric: value}} with the harness's own metric names."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm, tasks = task_manager(cfg, TaskManager)
    say(f"eval: lm-eval {', '.join(tasks)} on {m.name}" + (f" (adapter {m.adapter})" if m.adapter else ""))
    lm = HFLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=cfg.batch_size, max_length=context_length(m.model.config))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=cfg.limit or None,
                                      num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, OSError) as e:  # the hub unreachable while fetching a dataset
        raise UsageError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}); check the network, or use a local task with --task-dir") from None
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        out[task]["n"] = (res.get("n-samples", {}).get(task) or {}).get("effective")
        out[task]["num_fewshot"] = (res.get("n-shot") or {}).get(task)
    return out


def task_items(cfg: EvalConfig) -> list[str]:
    """The text of local lm-eval tasks' items (every string field of each row), for the decontamination check."""
    if not cfg.task_dir:
        return []
    import yaml

    from lifecycle.data.files import read_records

    texts = []
    for y in sorted(Path(cfg.task_dir).rglob("*.y*ml")):
        try:
            tcfg = yaml.safe_load(y.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        files = ((tcfg.get("dataset_kwargs") or {}).get("data_files")) or {}
        for f in (files.values() if isinstance(files, dict) else [files]):
            for f1 in (f if isinstance(f, list) else [f]):
                p = Path(f1) if Path(f1).is_absolute() else y.parent / f1
                if p.is_file():
                    texts += [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in read_records(str(p))]
    return texts


# ---------------------------------------------------------------------------
# 5. Decontamination: 13-gram overlap with the training data the manifests name
# ---------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def contaminated(items: list[str], training: list[str], n: int = NGRAM) -> list[bool]:
    """Whether each item shares a word n-gram with the training texts (lower-cased, punctuation dropped); an item
    shorter than n words counts when it occurs whole, as consecutive words, in a training text."""
    item_words = [words(t) for t in items]
    sizes = {min(n, len(w)) for w in item_words if w}
    grams: dict[int, set] = {k: set() for k in sizes}
    for t in training:
        w = words(t)
        for k in sizes:
            grams[k].update(hash(tuple(w[i : i + k])) for i in range(len(w) - k + 1))
    flags = []
    for w in item_words:
        k = min(n, len(w))
        flags.append(bool(w) and any(hash(tuple(w[i : i + k])) in grams[k] for i in range(len(w) - k + 1)))
    return flags


def training_texts(manifests: list[dict | None]) -> tuple[list[str], list[str]]:
    """Text of the training data the manifests' configs name (files only; the built-in world's training splits
    when a pretrain or sft config names no data), and a line per source."""
    from lifecycle.data.files import read_all

    texts, about, seen = [], [], set()
    for m in manifests:
        if not m:
            continue
        cfg, stage = m.get("config") or {}, m.get("stage")
        sources = [cfg[k] for k in ("data", "prompts") if isinstance(cfg.get(k), str) and cfg.get(k)]
        sources += [s for k in ("data",) if isinstance(cfg.get(k), list) for s in cfg[k]]
        for s in sources:
            if s in seen or not Path(s).exists():
                continue
            seen.add(s)
            rows = read_all([s], cfg.get("text_column", "text"))
            texts += [" ".join(_flat(v) for v in r.values()) for r in rows]
            about.append(f"{s} ({len(rows)} rows, from {stage})")
        if not sources and stage == "pretrain" and "world" not in seen:
            seen.add("world")
            texts += world.pretrain_documents(int(cfg.get("world_documents", 60000)), seed=int(cfg.get("seed", 0)))
            about.append("built-in world pretraining documents (regenerated from the recorded seed)")
    return texts, about


def _flat(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return " ".join(_flat(x) for x in v)
    if isinstance(v, dict):
        return " ".join(_flat(x) for x in v.values())
    return ""


def decontamination(model_manifests: list[dict | None], sets: dict[str, list[str]]) -> dict:
    """{set: {"items", "contaminated", "share"}} against the training data named in the models' manifests (and their parents')."""
    manifests: list[dict] = []
    for man in model_manifests:
        while man is not None and len(manifests) < 16:
            manifests.append(man)
            parent = (man.get("parent") or {}).get("path")
            man = artifacts.read_manifest(parent) if parent and Path(parent).is_dir() else None
    training, about = training_texts(manifests)
    out: dict = {"training_sources": about, "ngram": NGRAM}
    if not training:
        out["note"] = "no training data named in the manifests could be read"
        return out
    for name, items in sets.items():
        if items:
            flags = contaminated(items, training)
            out[name] = {"items": len(items), "contaminated": sum(flags), "share": sum(flags) / len(items)}
    return out


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
    rm = None
    if reward:
        art = check_artifact(reward, REWARD_MODEL, "--reward")
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
    sets["tasks"] = task_items(cfg)
    if cfg.decontaminate:
        say("eval: decontamination (13-gram overlap with the training data the manifests name)")
        res["decontamination"] = decontamination([s.manifest for s in specs], sets)
    return res


# ---------------------------------------------------------------------------
# Output: eval.json, report.md, plots, samples.jsonl
# ---------------------------------------------------------------------------
ROWS = [  # (label, path into a model's results)
    ("bits per byte", ("language_modelling", "bits_per_byte")),
    ("perplexity (per token)", ("language_modelling", "perplexity")),
    ("tokens / bytes", None),
    ("gold accuracy", ("world", "gold_accuracy")),
    ("gold accuracy, carry", ("world", "gold_accuracy_carry")),
    ("gold accuracy, no carry", ("world", "gold_accuracy_nocarry")),
    ("mean reward-model score", ("reward_score",)),
    ("answers that end", ("ended",)),
]


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"
    return str(v)


def _wr(w: dict | None) -> str:
    if not w:
        return "-"
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] ({w['wins']}/{w['ties']}/{w['losses']})"


def metrics_table(res: dict) -> str:
    """One markdown table: a column per model, a row per metric, then the win rates against each one's parent."""
    names = list(res["models"])
    ms = [res["models"][n] for n in names]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, path in ROWS:
        if path is None:
            vals = [f"{_get(m, ('language_modelling', 'tokens'))} / {_get(m, ('language_modelling', 'bytes'))}" for m in ms]
        else:
            vals = [_fmt(_get(m, path)) for m in ms]
            if all(v == "-" for v in vals):
                continue
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if any("win_rate" in m for m in ms):
        lines.append("| compared with | " + " | ".join(_get(m, ("win_rate", "vs")) or "-" for m in ms) + " |")
        for label, key in (("reward-model win rate", "reward"), ("gold win rate", "gold")):
            if any(_get(m, ("win_rate", key)) for m in ms):
                lines.append(f"| {label} | " + " | ".join(_wr(_get(m, ("win_rate", key))) for m in ms) + " |")
    bench = sorted({(t, k) for m in ms for t, v in (m.get("benchmarks") or {}).items() for k in v if k not in ("n", "num_fewshot")})
    for t, k in bench:
        lines.append(f"| {t} {k} | " + " | ".join(_fmt(_get(m, ("benchmarks", t, k))) for m in ms) + " |")
    return "\n".join(lines)


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot(res: dict, plots: Path) -> list[tuple[str, str]]:
    """PNG plots: each metric across the models (a line across stages with --lifecycle), and the win rates with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    names = list(res["models"])
    ms = [res["models"][n] for n in names]
    panels = [(label, path) for label, path in ROWS if path and path != ("ended",)
              and all(isinstance(_get(m, path), (int, float)) for m in ms)]
    made = []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (label, path) in zip(axes[0], panels):
        ys = [_get(m, path) for m in ms]
        if res.get("lifecycle"):
            ax.plot(names, ys, marker="o")
        else:
            ax.bar(names, ys, color=["C0", "C1", "C2", "C3"][: len(ys)])
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    _savefig(fig, plots / "metrics.png")
    plt.close(fig)
    made.append(("metrics across stages" if res.get("lifecycle") else "metrics", "plots/metrics.png"))
    wins = [(n, key, _get(m, ("win_rate", key))) for n, m in zip(names, ms) for key in ("reward", "gold") if _get(m, ("win_rate", key))]
    if wins:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.45 * len(wins)))
        for i, (n, key, w) in enumerate(wins):
            ax.errorbar([w["win_rate"]], [i], xerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]],
                        fmt="o", color="C0" if key == "reward" else "C2", capsize=3)
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(wins)), [f"{n} vs {res['models'][n]['win_rate']['vs']} ({k})" for n, k, _ in wins], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("win rate (ties count half), 95% bootstrap interval", fontsize=8)
        fig.tight_layout()
        _savefig(fig, plots / "win_rates.png")
        plt.close(fig)
        made.append(("win rates", "plots/win_rates.png"))
    return made


def decontamination_lines(dc: dict) -> list[str]:
    lines = ["## Decontamination", "", f"Share of evaluation items with a {dc.get('ngram', NGRAM)}-gram (an item shorter than that: "
             "the whole item) found in the training data the manifests name."]
    if dc.get("training_sources"):
        lines += ["", "Training data read: " + "; ".join(dc["training_sources"]) + "."]
    if dc.get("note"):
        return lines + ["", dc["note"] + "."]
    lines += ["", "| items | count | contaminated | share |", "|---|---|---|---|"]
    for name, v in dc.items():
        if isinstance(v, dict):
            flag = " **(contaminated: the scores on these items overstate)**" if v["contaminated"] else ""
            lines.append(f"| {name} | {v['items']} | {v['contaminated']} | {v['share']:.1%}{flag} |")
    return lines


def write_outputs(out: Path, res: dict, cfg: EvalConfig) -> Path:
    """OUT/samples.jsonl, plots/, report.md, then eval.json last (each by an atomic rename)."""
    out.mkdir(parents=True, exist_ok=True)
    samples = res.pop("samples", None)
    if samples:
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    table = metrics_table(res)
    made = plot(res, out / "plots")
    title = f"Evaluation of the stages of `{res['lifecycle']}`" if res.get("lifecycle") else f"Evaluation of `{cfg.model}`" + (f" against `{cfg.vs}`" if cfg.vs else "")
    lines = [f"# {title}", "", f"Held-out text: {res['items']['text']}."]
    if res["items"].get("prompts"):
        lines.append(f"Prompts: {res['items']['prompts']}; answers {'greedy' if cfg.temperature == 0 else f'sampled at T={cfg.temperature}'}.")
    if res.get("reward_model"):
        lines.append(f"Reward model: `{res['reward_model']}`.")
    lines += ["", table, "",
              "Bits per byte = total nats / (ln 2 x UTF-8 bytes), comparable across tokenizers; perplexity is per token of each "
              "model's own tokenizer. Win rates: share of prompts where the model's answer beats the other's "
              "(reward model: higher score; gold: right where the other is wrong); ties count half; "
              "[95% percentile-bootstrap interval over prompts] (wins/ties/losses).", ""]
    for caption, rel in made:
        lines += [f"## {caption[:1].upper() + caption[1:]}", "", f"![{caption}]({rel})", ""]
    if res.get("decontamination"):
        lines += decontamination_lines(res["decontamination"]) + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    res["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    res["versions"] = artifacts.versions()
    atomic_write_json(out / "eval.json", res)
    print(table)
    say(f"eval: wrote {out / 'eval.json'} and {out / 'report.md'}")
    return out / "eval.json"
