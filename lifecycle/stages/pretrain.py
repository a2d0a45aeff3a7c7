"""`llm pretrain`: train a tokenizer and a decoder-only model from scratch.

Read top to bottom:
  0. check inputs (before anything heavy)
  1. corpus: the built-in world or the user's files, with a held-out split
  2. tokenizer: train a byte-level BPE on the corpus (or reuse one)
  3. pack: documents joined with EOS, cut into blocks of seq_len
  4. model and optimizer (AdamW, decay on matrices only)
  5. resume from the newest checkpoint, if asked
  6. the loop: warmup+cosine lr, grad accumulation, clipping, eval, progress, checkpoints
  7. write the artifact (atomic; manifest last)

Data order is a pure function of (seed, step): the global batch for step s is
items [s*G, (s+1)*G) of an endless stream of seeded per-epoch permutations of
the blocks, where G = batch_size * grad_accum * processes. So resuming needs
only the step number, and N processes see exactly the blocks one process with
the same global batch would.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from lifecycle import artifacts, checkpoints, guard, sweep, training
from lifecycle.artifacts import looks_like_hub_id
from lifecycle.config import PretrainConfig, to_dict
from lifecycle.data import world as builtin_world
from lifecycle.data.files import text_documents
from lifecycle.errors import Interrupted, UsageError
from lifecycle.generate import generate_batch
from lifecycle.modeling import build_model, context_length, count_params, model_config
from lifecycle.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from lifecycle.training import batch_indices, check_tracker, say


# ---------------------------------------------------------------------------
# Packing (pure, tested on its own); the data order is training.batch_indices
# ---------------------------------------------------------------------------
def pack(token_lists: list[list[int]], eos_id: int, seq_len: int):
    """Join documents with EOS after each and cut the stream into (n_blocks, seq_len) blocks.

    Returns (blocks, dropped): the tail shorter than one block is dropped and counted.
    """
    total = sum(len(t) + 1 for t in token_lists)
    stream = torch.empty(total, dtype=torch.long)
    i = 0
    for t in token_lists:
        n = len(t)
        stream[i : i + n] = torch.as_tensor(t, dtype=torch.long)
        stream[i + n] = eos_id
        i += n + 1
    n_blocks = total // seq_len
    return stream[: n_blocks * seq_len].view(n_blocks, seq_len), total - n_blocks * seq_len


# ---------------------------------------------------------------------------
def _load_corpus(cfg: PretrainConfig) -> tuple[list[str], list[str], str]:
    """(train documents, held-out documents, description)."""
    if not cfg.data:
        return (
            builtin_world.pretrain_documents(cfg.world_documents, seed=cfg.seed),
            builtin_world.heldout_documents(500),
            f"built-in addition world: {cfg.world_documents} documents, 500 held-out documents",
        )
    docs = text_documents(cfg.data, cfg.text_column)
    rng = random.Random(1234)  # the held-out split must not move with --seed
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_eval = max(1, round(len(docs) * cfg.eval_fraction)) if len(docs) > 1 else 0
    if n_eval == 0:
        raise UsageError("the data holds a single document; pretraining needs at least 2 (one is held out for evaluation)")
    eval_docs = [docs[i] for i in order[:n_eval]]
    train_docs = [docs[i] for i in order[n_eval:]]
    return train_docs, eval_docs, f"{len(train_docs)} training / {len(eval_docs)} held-out documents from {', '.join(cfg.data)}"


def sample_prompt(cfg: PretrainConfig, eval_docs: list[str], tokenizer, n_tokens: int = 8) -> str:
    """The prompt of the greedy sample shown at each evaluation: --sample-prompt if set; on the
    user's data otherwise the first few tokens of a held-out document (the default prompt
    belongs to the built-in world and means nothing to a model of other text)."""
    default = PretrainConfig.__dataclass_fields__["sample_prompt"].default
    if not cfg.data or cfg.sample_prompt != default or not eval_docs:
        return cfg.sample_prompt
    ids = tokenizer(eval_docs[0], add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: max(1, min(n_tokens, len(ids) // 2))])


def _preflight(cfg: PretrainConfig) -> Path | None:
    """Checks that need no weights: output path, tracker, resume checkpoint. Returns the checkpoint to resume."""
    check_tracker(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file; give a directory path")
    # The model's name and context need no corpus: refuse them before reading data or training a tokenizer.
    probe = model_config(cfg.model, max(cfg.vocab_size, 2), 0, 1)
    if cfg.seq_len > context_length(probe):
        raise UsageError(f"seq_len={cfg.seq_len} exceeds the model's context of {context_length(probe)} positions; "
                         "lower seq_len or pick a larger model")
    if cfg.resume:
        return checkpoints.resume_checkpoint(cfg, warn=say)
    if cfg.tokenizer and not Path(cfg.tokenizer).exists():
        if not looks_like_hub_id(cfg.tokenizer):
            raise UsageError(f"--tokenizer {cfg.tokenizer} not found; pass a tokenizer directory or hub id, or leave it out to train one")
    return None


def run(cfg: PretrainConfig) -> Path:
    """Run the stage under the --out rules every stage keeps (lifecycle/guard.py): checked before anything is
    written, locked while it runs, left as it was when the run is refused."""
    with guard.claim(cfg):
        return _run(cfg)


def _run(cfg: PretrainConfig) -> Path:
    ck = _preflight(cfg)
    train_docs, eval_docs, about = _load_corpus(cfg)  # bad data fails here, before any weights exist

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPU use bf16 or no")

    out = Path(cfg.out)
    tok_dir = out / "checkpoints" / "tokenizer"

    # -- 0. accelerator ------------------------------------------------------
    acc = training.make_accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=training.project_config(out),  # TensorBoard events in OUT/tb/pretrain, as every stage's
    )
    set_seed(cfg.seed)

    # -- 1. corpus (read above) ---------------------------------------------------
    say(f"corpus: {about}")

    # -- 2. tokenizer --------------------------------------------------------------
    # Every rank trains (or loads) it, so that a check below fails on all ranks alike
    # instead of leaving the others waiting at a barrier; BPE training is deterministic,
    # and a hash comparison across ranks makes sure. Nothing is written before the checks.
    if ck is not None:
        tokenizer = load_tokenizer(str(tok_dir))
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
        say(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - t0:.1f}s")
    _same_on_all_ranks(acc, tokenizer.backend_tokenizer.to_str())

    # -- 3. pack -------------------------------------------------------------
    t0 = time.perf_counter()
    enc = lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]  # noqa: E731
    train_blocks, dropped = pack(enc(train_docs), tokenizer.eos_token_id, cfg.seq_len)
    eval_blocks, _ = pack(enc(eval_docs), tokenizer.eos_token_id, cfg.seq_len)
    if len(train_blocks) == 0:
        raise UsageError(
            f"the training corpus has fewer tokens than one block of seq_len={cfg.seq_len}; "
            f"add more text or lower seq_len (--set seq_len=N)"
        )
    if len(eval_blocks) == 0:
        raise UsageError(
            f"the held-out documents have fewer tokens than one block of seq_len={cfg.seq_len}; "
            f"add more text, raise eval_fraction, or lower seq_len"
        )
    say(f"packed: {len(train_blocks)} train blocks x {cfg.seq_len} tokens ({dropped} tail tokens dropped), "
        f"{len(eval_blocks)} held-out blocks, in {time.perf_counter() - t0:.1f}s")

    # -- 4. model and optimizer ------------------------------------------------
    vocab = -(-len(tokenizer) // cfg.vocab_multiple) * cfg.vocab_multiple  # rounded up: whole tensor-core tiles
    mconf = model_config(cfg.model, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if cfg.seq_len > context_length(mconf):
        raise UsageError(f"seq_len={cfg.seq_len} exceeds the model's context of {context_length(mconf)} positions; lower seq_len or pick a larger model")
    training.check_memory(cfg, mconf.to_dict(), "pretrain", gpus=acc.num_processes)
    if ck is None and acc.is_main_process:  # all checks passed: now the run may write
        tok_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, tok_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(mconf)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    _, n_params = count_params(model)
    if acc.is_main_process:
        training.check_disk(out, n_params, cfg.keep_checkpoints)
    padded = f" ({len(tokenizer)} tokens, padded)" if mconf.vocab_size != len(tokenizer) else ""
    say(f"model: {cfg.model} ({mconf.model_type}), {n_params / 1e6:.2f}M parameters, vocab {mconf.vocab_size}{padded}")
    # AdamW's multi-tensor (foreach) path: the same arithmetic as the per-parameter loop, bit for bit on the CPU,
    # in a few calls per step instead of a dozen per parameter. On a GPU the fused kernel (one launch per step,
    # not bit-equal to the loop) is the standard fast path.
    fused = acc.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        fused=fused, foreach=not fused,
    )
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)

    world = acc.num_processes
    G = cfg.batch_size * cfg.grad_accum * world
    total = cfg.total_steps
    tokens_per_step = G * cfg.seq_len

    def evaluate() -> float:
        """Mean held-out loss over the first eval_batches micro-batches of held-out blocks (all ranks)."""
        model.eval()
        n = min(len(eval_blocks), cfg.eval_batches * cfg.batch_size)
        losses = torch.zeros(2, device=acc.device)
        with torch.no_grad():
            for i in range(acc.process_index * cfg.batch_size, n, cfg.batch_size * world):
                x = eval_blocks[i : i + cfg.batch_size].to(acc.device)
                with acc.autocast():
                    loss = model(input_ids=x, labels=x).loss.float()
                losses += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=acc.device)])
        losses = acc.reduce(losses, reduction="sum")
        model.train()
        return (losses[0] / losses[1]).item()

    def completion_accuracy() -> float | None:
        """Built-in world only: share of held-out sums completed correctly by greedy decoding.

        Each held-out problem is posed in one of the four templates after one context
        sentence, as sums appear in the corpus (mid-document, the number's leading space
        on its first digit), e.g. "add 12 and 30 to get 42 . 48 plus 87 equals" -> " 135".
        """
        if cfg.data:
            return None
        probs = builtin_world.heldout_problems()
        context = "add 12 and 30 to get 42 . "
        prompts = [context + builtin_world.TEMPLATES[i % 4].split(" {c}")[0].format(a=p.a, b=p.b) for i, p in enumerate(probs)]
        outs = generate_batch(acc.unwrap_model(model), tokenizer, prompts, max_new_tokens=5)
        return sum(o.text.split()[:1] == [str(p.answer)] for p, o in zip(probs, outs)) / len(probs)

    prompt = sample_prompt(cfg, eval_docs, tokenizer)

    def sample_text() -> str:
        m = acc.unwrap_model(model)
        s = generate_batch(m, tokenizer, [prompt], max_new_tokens=12)[0]
        return (prompt + s.text).replace("\n", " ")

    # -- 5. resume ---------------------------------------------------------------
    if ck is not None:
        state = checkpoints.load_checkpoint(acc, ck)
        start, tokens_seen, eval_initial = state["step"], state["tokens_seen"], state["eval_loss_initial"]
        train_time = state.get("train_seconds", 0.0)
        say(f"resumed from {ck} at step {start}")
    else:
        start, tokens_seen, train_time = 0, 0, 0.0
        eval_initial = evaluate()
        say(f"step 0: held-out loss {eval_initial:.4f} (ppl {math.exp(eval_initial):.1f})")
    log = training.MetricLog(out / "log.jsonl", acc, truncate_after_step=start if ck is not None else None)
    if ck is None:
        log.log(0, eval_loss=eval_initial)
    if acc.is_main_process and cfg.report_to != "none":
        acc.init_trackers("pretrain", config={k: v for k, v in to_dict(cfg).items() if isinstance(v, (int, float, str, bool))})

    peak = training.PeakFlops(acc.device, "bfloat16" if cfg.mixed_precision == "bf16" else "float32")
    fpt = training.flops_per_token(mconf, cfg.seq_len)
    say(f"training {total} steps x {tokens_per_step} tokens (batch {cfg.batch_size} x accum {cfg.grad_accum} x "
        f"{world} process(es) x seq {cfg.seq_len}); MFU against the {peak.describe()}")

    # -- 6. the loop ---------------------------------------------------------------
    recipe = checkpoints.fingerprint(cfg)  # recorded in each checkpoint, checked on resume
    ck_state = {"tokens_seen": tokens_seen, "eval_loss_initial": eval_initial, "train_seconds": train_time, "fingerprint": recipe}
    model.train()
    pinned = acc.device.type == "cuda"  # page-locked batches copy to the GPU without stalling the host
    meter = training.Throughput(start, total)
    eval_loss = eval_initial
    t_start = time.perf_counter()
    step = start
    with training.GracefulStop() as stop:
        while step < total:
            t_step = time.perf_counter()
            lr = training.lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(step, G, len(train_blocks), cfg.seed)
            micro_losses = []
            for micro in range(cfg.grad_accum):
                lo = (micro * world + acc.process_index) * cfg.batch_size
                x = train_blocks[idx[lo : lo + cfg.batch_size]]
                x = x.pin_memory().to(acc.device, non_blocking=True) if pinned else x.to(acc.device)
                sync = micro == cfg.grad_accum - 1
                ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
                with ctx:
                    with acc.autocast():
                        loss = model(input_ids=x, labels=x).loss
                    acc.backward(loss / cfg.grad_accum)
                micro_losses.append(loss.detach().float())  # read after the last backward: no wait per micro-batch
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            grad_norm = float(grad_norm)  # the step's one wait for a GPU; the losses below are ready by then
            loss_sum = 0.0
            for v in torch.stack(micro_losses).tolist():
                loss_sum += v / cfg.grad_accum
            training.check_finite(step + 1, loss_sum, grad_norm, out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t_step
            meter.add(tokens_per_step, dt)
            train_time += dt

            if step % cfg.log_every == 0 or step == total:
                loss_avg = acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="mean").item()
                tps, eta = meter.report(step)
                mfu = peak.mfu(tps * fpt / world)  # per process; never above 1 (a faster step raises the peak)
                say(f"step {step}/{total} | loss {loss_avg:.4f} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                    f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% of {peak.label()} | ETA {training.format_eta(eta)}")
                log.log(step, loss=loss_avg, lr=lr, grad_norm=grad_norm, tokens_per_second=tps, mfu=mfu,
                        mfu_peak=peak.label(), tokens_seen=tokens_seen)
            if step % cfg.eval_every == 0 or step == total:
                eval_loss = evaluate()
                sample = sample_text() if acc.is_main_process else ""
                correct = completion_accuracy() if acc.is_main_process else None
                shown = f" | held-out sums right {100 * correct:.1f}%" if correct is not None else ""
                say(f"step {step}: held-out loss {eval_loss:.4f} (ppl {math.exp(eval_loss):.2f}){shown} | sample: {sample!r}")
                log.log(step, eval_loss=eval_loss, eval_ppl=math.exp(eval_loss), sample=sample,
                        **({"heldout_completion_accuracy": correct} if correct is not None else {}))
                # `llm sweep` only: the trial's pruner may stop this run here (a no-op otherwise).
                sweep.report_eval(step, total, {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss),
                                                **({"heldout_completion_accuracy": correct} if correct is not None else {})})
            ck_state = {"tokens_seen": tokens_seen, "eval_loss_initial": eval_initial, "train_seconds": train_time,
                        "fingerprint": recipe}
            if stop.requested:
                path = checkpoints.save_checkpoint(acc, out, step, ck_state, cfg.keep_checkpoints)
                raise Interrupted(f"{stop.requested} at step {step}: checkpoint saved to {path}; continue with --resume")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                checkpoints.save_checkpoint(acc, out, step, ck_state, cfg.keep_checkpoints)

    # -- 7. the artifact -------------------------------------------------------
    if step == start:  # resumed from the final checkpoint: nothing left to train, measure afresh
        eval_loss = evaluate()
    elapsed = time.perf_counter() - t_start
    acc_final = completion_accuracy() if acc.is_main_process else None  # measured once more, after any resume
    metrics = {
        "eval_loss_initial": eval_initial,
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss),
        "eval_loss_drop": eval_initial - eval_loss,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / max(train_time, 1e-9),
        "train_seconds": train_time,
        "wall_seconds_this_session": elapsed,
        "steps": total,
        "parameters": n_params,
    }
    if acc_final is not None:
        metrics["heldout_completion_accuracy"] = acc_final
    # A final checkpoint makes `--resume` on a finished run a no-op rather than an error.
    checkpoints.save_checkpoint(acc, out, total, {**ck_state, "tokens_seen": tokens_seen, "train_seconds": train_time},
                                cfg.keep_checkpoints)
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        m.generation_config.eos_token_id = tokenizer.eos_token_id
        m.generation_config.pad_token_id = tokenizer.pad_token_id
        staging = artifacts.staging_dir(out)
        with artifacts.quiet_saving():
            m.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging)  # readable by transformers 4.x too
        artifacts.publish(staging, out, stage="pretrain", config=to_dict(cfg), metrics=metrics, parent=None, seed=cfg.seed)
        if acc_final is not None:
            say(f"held-out sums completed correctly: {100 * acc_final:.1f}%")
        say(f"held-out loss {eval_initial:.3f} -> {eval_loss:.3f} ({eval_initial - eval_loss:.2f} nats) | "
            f"{metrics['tokens_per_second']:,.0f} tok/s | wrote {out}")
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _same_on_all_ranks(acc, text: str) -> None:
    """Fail loudly if ranks disagree (e.g. tokenizers trained differently)."""
    if acc.num_processes == 1:
        return
    digests = [None] * acc.num_processes
    dist.all_gather_object(digests, hashlib.sha256(text.encode()).hexdigest())
    assert len(set(digests)) == 1, "ranks built different tokenizers; pass --tokenizer to share one"
