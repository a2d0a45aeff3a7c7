"""`llm grpo`: group relative policy optimisation with TRL's GRPOTrainer (full, LoRA, QLoRA or DoRA).

GRPO (Shao et al. 2024, arXiv:2402.03300) drops PPO's critic: for each prompt
it samples a group of G responses, and a response's advantage is its reward
minus the group's mean, over the group's standard deviation. The loss is PPO's
clipped surrogate with that advantage on every token, plus β·KL(π || π_ref)
(the k3 estimator) in the loss. docs/alignment.md has the equations.

Rewards come from one of three places, all called the way TRL calls a reward
function (prompts, completions, completion_ids -> one float per completion):
a reward-model artifact (scored by `reward_model.score`, as `llm ppo` reads it),
the built-in world's gold checker (`--reward-fn gold`: 1 right, 0 wrong, a
verifiable reward), or the user's `module:function`.

1. check the inputs: the policy's kind (a reward model given as --policy is
   refused), the reward source, the prompts, the resume request, the memory estimate
2. tokenizer, prompts and the reward function
3. model: full weights, or adapters (the reference is then the adapter disabled)
4. measure the starting point on held-out prompts: greedy gold accuracy, the
   reward of greedy responses (RM score with --reward), KL to the reference
5. train: TRL samples the groups (transformers' generate, no vLLM) and steps;
   every eval_every steps the held-out evaluation; the watchdog reads each step's
   log (zero-variance groups, collapse, and reward hacking at evaluations)
6. the final model (adapter merged unless --no-merge), the final evaluation
7. write the artifact: model, OUT/adapter, tokenizer, OUT/log.jsonl, lifecycle.json
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback

from lifecycle import artifacts, finetune, guard, rl, training
from lifecycle.artifacts import Artifact
from lifecycle.config import GRPOConfig, PPOConfig
from lifecycle.data import world
from lifecycle.data.prompts import Prompts, as_user_turns, load_prompts
from lifecycle.errors import Interrupted, UsageError
from lifecycle.generate import generate_batch, gold_accuracy, kl_to_reference, render_prompts, stop_ids
from lifecycle.modeling import CAUSAL_HEAD, count_params, describe_trainable, load_causal_lm, load_for_training
from lifecycle.reward_model import load_reward_model, score
from lifecycle.roles import check_reward_artifact
from lifecycle.tokenizer import load_tokenizer
from lifecycle.training import say
from lifecycle.watchdog import Watchdog


# TRL's reward-function form: (prompts, completions, completion_ids, **kw) -> one float per completion.
RewardFn = Callable[..., list]


@dataclasses.dataclass
class TrlGRPOArgs(trl.GRPOConfig):
    """TRL's GRPOConfig with the one argument our shared trainer arguments pass that GRPO has no use for:
    its sequences are the prompt plus at most max_completion_length sampled tokens."""

    max_length: int | None = None


TrlGRPOArgs.__name__ = "GRPOConfig"  # attach_progress names the TensorBoard directory after the config class


# ---------------------------------------------------------------------------
# 1. Inputs
# ---------------------------------------------------------------------------
def check_policy(cfg: GRPOConfig) -> Artifact:
    try:
        return artifacts.check_artifact(cfg.base, artifacts.CAUSAL_LM, "--policy", verify=cfg.verify)
    except UsageError as first:
        try:
            artifacts.check_artifact(cfg.base, artifacts.REWARD_MODEL, "--policy")
        except UsageError:
            raise first from None  # not a reward model either: the causal-LM check's reason (e.g. a checksum) stands
        raise UsageError(f"--policy {cfg.base} is a reward model; pass the causal LM to improve as --policy "
                         f"(e.g. runs/default/sft) and the reward model as --reward") from None


def _text(completion) -> str:
    """A completion's text: TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def gold_reward(stops: list[int]) -> RewardFn:
    """The built-in world's gold checker as a reward: 1.0 for exactly the sum, ended by a stop id; else 0.0."""
    stops = set(stops)

    def gold(prompts, completions, completion_ids, **kw) -> list[float]:
        return [float(world.gold_check(_question(p), _text(c), bool(ids) and ids[-1] in stops))
                for p, c, ids in zip(prompts, completions, completion_ids)]

    return gold


def rm_reward(rm, rm_tok, stops: list[int], missing_eos_penalty: float) -> RewardFn:
    """The reward model's score of (prompt, response), as `llm ppo` reads it, less a penalty for never ending."""
    stops = set(stops)

    def reward_model(prompts, completions, completion_ids, **kw) -> list[float]:
        s = score(rm, rm_tok, list(prompts), [_text(c) for c in completions])
        return [x - missing_eos_penalty * (not (ids and ids[-1] in stops)) for x, ids in zip(s, completion_ids)]

    return reward_model


def user_reward(spec: str) -> RewardFn:
    """`module:function` imported (the working directory first on the path), checked to be callable."""
    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise UsageError(f"--reward-fn {spec}: no module {e.name!r} (looked in the working directory and the Python "
                         f"path); give module:function of an importable file, e.g. my_rewards:score") from None
    except AttributeError:
        raise UsageError(f"--reward-fn {spec}: module {module!r} has no function {name!r}; check the name") from None
    if not callable(fn):
        raise UsageError(f"--reward-fn {spec}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


class CheckedReward:
    """Wraps the reward function: checks it returns one number per completion (a UsageError naming the
    function otherwise), and keeps what the watchdog reads (distinct-2 of the step's responses)."""

    def __init__(self, fn: RewardFn, label: str):
        self.fn, self.label = fn, label
        self.__name__ = label  # TRL logs each reward function's mean under its name
        self.distinct_2 = 0.0

    def __call__(self, prompts, completions, completion_ids, **kw) -> list:
        out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kw)
        if isinstance(out, torch.Tensor):
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != len(completions) or not all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in out):
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise UsageError(f"reward function {self.label} returned {got} for {len(completions)} completions; it must "
                             f"return a list of one float (or None) per completion")
        self.distinct_2 = rl.distinct_n([list(i) for i in completion_ids], 2)
        return [None if x is None else float(x) for x in out]


# ---------------------------------------------------------------------------
# 4. Held-out evaluation (as `llm ppo`'s: reward of greedy responses, gold accuracy, KL to the reference)
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class HeldOut:
    raw: list  # held-out prompts as given to the reward function
    rendered: list[str]  # the same through the chat template
    problems: list | None  # as world problems (gold checker), else None



@torch.no_grad()
def evaluate(model, reference, tok, held: HeldOut, reward: CheckedReward, cfg: GRPOConfig, *, kl: bool = True) -> dict:
    """Held-out: the reward of greedy responses, greedy gold accuracy (built-in world), KL on sampled responses."""
    greedy = generate_batch(model, tok, held.rendered, max_new_tokens=cfg.max_new_tokens)
    distinct = reward.distinct_2
    r = reward(held.raw, [[{"role": "assistant", "content": s.text}] if isinstance(p, list) else s.text
                          for p, s in zip(held.raw, greedy)], [s.token_ids for s in greedy])
    reward.distinct_2 = distinct  # the watchdog's reading is of the training responses
    vals = [x for x in r if x is not None]
    res = {"eval_score": sum(vals) / max(len(vals), 1),
           "eval_length": sum(len(s.token_ids) for s in greedy) / max(len(greedy), 1),
           "eval_eos_rate": sum(s.ended for s in greedy) / max(len(greedy), 1)}
    if held.problems is not None:
        g = gold_accuracy(model, tok, held.problems)
        res.update(eval_gold_accuracy=g["gold_accuracy"], eval_gold_accuracy_carry=g["gold_accuracy_carry"],
                   eval_gold_accuracy_nocarry=g["gold_accuracy_nocarry"])
    res["eval_kl"] = kl_to_reference(model, reference, tok, held.rendered[:128], max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed) if kl else 0.0
    return res


def _gold(m: dict) -> str:
    return f" | gold {100 * m['eval_gold_accuracy']:.1f}%" if "eval_gold_accuracy" in m else ""


# ---------------------------------------------------------------------------
# 5. What runs beside the trainer: evaluation and the watchdog
# ---------------------------------------------------------------------------
STATE_FILE = "grpo_state.json"  # in each checkpoint: the initial evaluation and the watchdog's state


class Beside(TrainerCallback):
    def __init__(self, cfg: GRPOConfig, tok, held: HeldOut, reward: CheckedReward, dog: Watchdog, initial: dict | None):
        self.cfg, self.tok, self.held, self.reward, self.dog = cfg, tok, held, reward, dog
        self.initial, self.last_eval, self.reference = initial, initial, None
        self.zero_var_events: list[dict] = []
        self.zero_var_active = False
        self.stopped: list[str] = []  # stop_on_collapse: the alarms that stopped the run

    def _stop_on(self, alarms: list[dict], control) -> None:
        """stop_on_collapse: a watchdog alarm (not the zero-variance notice, which a verifiable reward raises as
        a matter of course) saves a checkpoint at this step and ends training; `run` then raises Interrupted."""
        serious = [a["alarm"] for a in alarms if a["alarm"] != "zero_variance"]
        if serious and self.cfg.stop_on_collapse:
            self.stopped += serious
            control.should_save = True
            control.should_training_stop = True

    # held-out evaluation every eval_every steps, into the log history (OUT/log.jsonl)
    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        if step % self.cfg.eval_every == 0 or step == state.max_steps:
            self.last_eval = evaluate(model, self.reference, self.tok, self.held, self.reward, self.cfg)
            state.log_history.append({"step": step, **self.last_eval})
            alarms = self.dog.observe_eval(step, self.last_eval["eval_score"], self.last_eval.get("eval_gold_accuracy"))
            for a in alarms:
                say(f"WATCHDOG [{a['alarm']}] at step {a['step']}: {a['message']}")
            self._stop_on(alarms, control)
            say(f"step {step}: held-out reward {self.last_eval['eval_score']:.3f}{_gold(self.last_eval)} | "
                f"KL {self.last_eval['eval_kl']:.3f} nats/response")

    # the watchdog on each step's log
    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "reward" not in logs:
            return
        step = state.global_step
        zero = logs.get("frac_reward_zero_std", 0.0)
        m = {"kl": logs.get("kl", 0.0), "response_length": logs.get("completions/mean_length", 0.0),
             "distinct_2": self.reward.distinct_2, "eos_rate": 1.0 - logs.get("completions/clipped_ratio", 0.0),
             "entropy": logs.get("entropy", 0.0)}
        logs["distinct_2"] = m["distinct_2"]
        alarms = self.dog.observe_step(step, m)
        if zero > self.cfg.watch_zero_std and not self.zero_var_active:
            ev = {"step": step, "alarm": "zero_variance",
                  "message": f"{100 * zero:.0f}% of the groups have the same reward for every response (> "
                             f"{100 * self.cfg.watch_zero_std:.0f}%): they give no gradient; raise num_generations or "
                             f"temperature, or use a reward that tells responses apart"}
            self.zero_var_events.append(ev)
            alarms.append(ev)
        self.zero_var_active = zero > self.cfg.watch_zero_std
        if state.is_world_process_zero:
            print(f"step {step:>5}/{state.max_steps}  reward {logs['reward']:.3f}±{logs.get('reward_std', 0.0):.3f}  "
                  f"zero-variance groups {100 * zero:.0f}%  len {m['response_length']:.2f}  KL {m['kl']:.4f}", flush=True)
            for a in alarms:
                print(f"WATCHDOG [{a['alarm']}] at step {a['step']}: {a['message']}", flush=True)
        self._stop_on(alarms, control)

    # the state a resume needs, written into each checkpoint
    def on_save(self, args, state, control, **kw):
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ck.is_dir():
            artifacts.atomic_write_text(ck / STATE_FILE, json.dumps(self.state_dict()))

    def state_dict(self) -> dict:
        return {"initial": self.initial, "last_eval": self.last_eval, "watchdog": self.dog.state_dict(),
                "zero_variance": {"events": self.zero_var_events, "active": self.zero_var_active}}

    def load_state_dict(self, s: dict) -> None:
        self.initial, self.last_eval = s["initial"], s["last_eval"]
        self.dog.load_state_dict(s["watchdog"])
        self.zero_var_events, self.zero_var_active = s["zero_variance"]["events"], s["zero_variance"]["active"]

    @property
    def events(self) -> list[dict]:
        return sorted(self.dog.events + self.zero_var_events, key=lambda e: e["step"])


def make_watchdog(cfg: GRPOConfig) -> Watchdog:
    """`llm ppo`'s watchdog with PPO's default thresholds; reward hacking with this run's own."""
    p = PPOConfig()
    return Watchdog(negative_kl=p.watch_negative_kl, length_drift=p.watch_length_drift, distinct=p.watch_distinct,
                    eos_rate=p.watch_eos_rate, entropy=p.watch_entropy, hack_gold_drop=cfg.watch_hack_gold_drop)


def write_log(out: Path, history: list[dict], initial: dict) -> None:
    """OUT/log.jsonl: the trainer's entries (finetune.write_log) with the held-out evaluations among them, step 0 first."""
    path = finetune.write_log(out, history)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows += [{"step": 0, **initial}] + [e for e in history if "eval_score" in e]
    rows.sort(key=lambda r: r["step"])  # stable: at one step the training entry comes before the evaluation
    artifacts.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------
def run(cfg: GRPOConfig) -> Path:
    """Run the stage under the --out rules every stage keeps (lifecycle/guard.py)."""
    with guard.claim(cfg):
        return _run(cfg)


def _run(cfg: GRPOConfig) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Inputs ------------------------------------------------------------
    info = check_policy(cfg)
    rm_info = check_reward_artifact(cfg.reward, "--reward") if cfg.reward else None
    fn = user_reward(cfg.reward_fn) if cfg.reward_fn not in ("", "gold") else None
    prompts: Prompts = load_prompts(cfg.prompts, column=cfg.prompt_column, eval_prompts=cfg.eval_prompts,
                                    world_prompts=cfg.world_prompts, seed=cfg.seed)
    if cfg.reward_fn == "gold":
        texts = [_question(p) for p in prompts.train + prompts.eval]
        bad = next((t for t in texts if world.parse_problem(t) is None), None)
        if bad is not None:
            raise UsageError(f"--reward-fn gold grades the built-in world's problems, but the prompt {bad[:60]!r} is "
                             f"not one; use --reward RM_DIR or --reward-fn module:function for your prompts")
    resuming = finetune.check_resume(cfg)
    training.check_tracker(cfg)
    training.quiet()
    finetune.set_threads(cfg)

    # 2. Tokenizer, prompts, the reward ------------------------------------
    tok = load_tokenizer(info.path)
    chat = cfg.chat_template and bool(tok.chat_template)
    train_raw = as_user_turns(prompts.train) if chat else prompts.train
    eval_raw = as_user_turns(prompts.eval) if chat else prompts.eval
    held = HeldOut(eval_raw, render_prompts(tok, eval_raw), prompts.problems)
    longest = max(len(i) for i in tok(render_prompts(tok, train_raw[:4000]) + held.rendered, add_special_tokens=False)["input_ids"])
    if longest + cfg.max_new_tokens > cfg.max_length:
        raise UsageError(f"the longest prompt is {longest} tokens, with max_new_tokens={cfg.max_new_tokens} over "
                         f"max_length={cfg.max_length}; raise max_length or shorten the prompts")
    guard.before_loading(cfg, info, "grpo", seq_len=longest + cfg.max_new_tokens,
                         absent_roles=(("reference",) if cfg.kl_coef == 0 else ()) + (() if cfg.reward else ("reward",)))
    say(f"grpo: prompts: {prompts.about}")

    # 3. Model -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = load_for_training(info.path, cfg, head=CAUSAL_HEAD, gradient_checkpointing=cfg.gradient_checkpointing)
    stops = stop_ids(tok, model)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops  # TRL stops at each of them
    if cfg.reward:
        rm = load_reward_model(rm_info.path)
        label, reward = f"reward model {cfg.reward}", rm_reward(rm, load_tokenizer(rm_info.path), stops, cfg.missing_eos_penalty)
    elif cfg.reward_fn == "gold":
        label, reward = "gold checker", gold_reward(stops)
    else:
        label, reward = cfg.reward_fn, fn
    reward = CheckedReward(reward, "gold" if cfg.reward_fn == "gold" else ("reward_model" if cfg.reward else cfg.reward_fn))
    mode = finetune.mode_name(cfg)
    say(f"grpo: {mode} training of {cfg.base}: {describe_trainable(model)}; reward: {label}; groups of "
        f"{cfg.num_generations}, {cfg.prompts_per_step} prompts per step, β={cfg.kl_coef}")
    trainable, total = count_params(model)

    # 4. Starting point ----------------------------------------------------
    dog = make_watchdog(cfg)
    beside = Beside(cfg, tok, held, reward, dog, None)
    if resuming:
        from lifecycle.checkpoints import latest_checkpoint

        beside.load_state_dict(json.loads((latest_checkpoint(out) / STATE_FILE).read_text(encoding="utf-8")))
    else:
        beside.initial = beside.last_eval = evaluate(model, None, tok, held, reward, cfg, kl=False)  # π = π_ref: KL 0
        dog.observe_eval(0, beside.initial["eval_score"], beside.initial.get("eval_gold_accuracy"))
    say(f"grpo: held-out reward {beside.initial['eval_score']:.3f}{_gold(beside.initial)} (initial)")

    # 5. Train -------------------------------------------------------------
    args = finetune.trainer_args(
        TrlGRPOArgs, cfg, has_eval=False, resuming=resuming,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=0, top_p=1.0, beta=cfg.kl_coef, epsilon=cfg.clip_range, num_iterations=cfg.num_iterations,
        loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, disable_dropout=True,
        gradient_checkpointing=cfg.gradient_checkpointing, use_vllm=False, log_completions=False,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in train_raw]), processing_class=tok)
    if cfg.use_peft:
        beside.reference = None  # the adapter disabled
    else:
        beside.reference = trainer.ref_model if trainer.ref_model is not None else load_causal_lm(info.path).eval()
    finetune.fp32_adapters_without_autocast(trainer, cfg)
    finetune.attach_progress(trainer, cfg)
    trainer.add_callback(beside)
    t_train = time.perf_counter()
    finetune.train(trainer, cfg, resuming)  # Ctrl-C/SIGTERM: a checkpoint, then Interrupted (exit 130)
    train_seconds = time.perf_counter() - t_train
    if beside.stopped:
        from lifecycle.checkpoints import latest_checkpoint

        raise Interrupted(f"watchdog ({', '.join(dict.fromkeys(beside.stopped))}) at step {trainer.state.global_step}: "
                          f"checkpoint saved to {latest_checkpoint(out)}; inspect OUT/log.jsonl, then --resume or "
                          "change the recipe")

    # 6. Final model and evaluation ----------------------------------------
    final_eval = beside.last_eval if trainer.state.global_step == cfg.total_steps and beside.last_eval else None
    if final_eval is None or "eval_kl" not in final_eval:
        final_eval = evaluate(trainer.model, beside.reference, tok, held, reward, cfg)
    scratch = out / f".adapter-{os.getpid()}"
    final = finetune.final_model(trainer.model, cfg, info.path, CAUSAL_HEAD, None, scratch)
    final.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    initial = beside.initial
    metrics: dict = {"score_initial": initial["eval_score"], "score": final_eval["eval_score"], "kl": final_eval["eval_kl"],
                     "response_length": final_eval["eval_length"], "eos_rate": final_eval["eval_eos_rate"]}
    if "eval_gold_accuracy" in initial:
        for k in ("", "_carry", "_nocarry"):
            metrics[f"gold_accuracy{k}_initial"] = initial[f"eval_gold_accuracy{k}"]
            metrics[f"gold_accuracy{k}"] = final_eval[f"eval_gold_accuracy{k}"]
    zero = [e["frac_reward_zero_std"] for e in trainer.state.log_history if "frac_reward_zero_std" in e]
    metrics.update(zero_variance_groups=sum(zero) / max(len(zero), 1), reward_hacking=dog.hacking,
                   watchdog_alarms=[e["alarm"] for e in beside.events], trainable_params=trainable, total_params=total,
                   steps=trainer.state.global_step, train_seconds=round(train_seconds, 1),
                   wall_seconds=round(time.perf_counter() - t_start, 1))
    g = (f" | gold accuracy {100 * metrics['gold_accuracy_initial']:.1f}% -> {100 * metrics['gold_accuracy']:.1f}%"
         if "gold_accuracy" in metrics else "")
    say(f"grpo: held-out reward {metrics['score_initial']:.3f} -> {metrics['score']:.3f}{g} | KL {metrics['kl']:.3f} nats "
        f"| zero-variance groups {100 * metrics['zero_variance_groups']:.0f}% on average")

    # 7. Artifact ----------------------------------------------------------
    write_log(out, trainer.state.log_history, initial)
    extra = {"mode": mode, "reward": artifacts.parent_record(rm_info) if rm_info else {"function": cfg.reward_fn},
             "watchdog": beside.events}
    path = finetune.save(final, trainer.model, tok, cfg, stage="grpo", metrics=metrics,
                         parent=artifacts.parent_record(info), extra=extra)
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"grpo: wrote {path} in {metrics['wall_seconds']:.0f}s")
    return path
