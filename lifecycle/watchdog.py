"""The PPO watchdog: spot a run going wrong from the metrics it already logs.

Pure Python (no torch): `observe_step` takes each rollout's metrics,
`observe_eval` each held-out evaluation, and both return the alarms raised.
The baselines (first rollout's length, distinct-2 and entropy; the best
held-out gold accuracy so far) travel in checkpoints via state_dict.

What it watches, and why each is a symptom:
- negative KL: the sampled log-ratio to the reference averaging below zero
  means the KL estimate is broken (a tokenizer or padding mismatch, or a
  policy exploiting the k1 estimator), since KL(π||π_ref) >= 0;
- response-length drift: reward models often pay for length, and a policy
  that grows or shrinks its answers a lot is usually exploiting that;
- repetition: distinct-2 of the responses collapsing means the policy found
  one string the reward model likes;
- EOS rate: responses that stop ending are cut at max_new_tokens and scored
  on a truncated text;
- entropy collapse: the policy has become (near) deterministic and explores
  no more;
- reward hacking (built-in world, where a gold checker exists): the reward
  model's held-out score goes up while gold accuracy goes down — the
  policy is pleasing the reward model, not getting better (Gao, Schulman,
  Hilton 2023, "Scaling Laws for Reward Model Overoptimization").
"""

from __future__ import annotations


class Watchdog:
    def __init__(self, *, negative_kl: float, length_drift: float, distinct: float, eos_rate: float, entropy: float,
                 hack_gold_drop: float):
        self.negative_kl = negative_kl
        self.length_drift = length_drift
        self.distinct = distinct
        self.eos_rate = eos_rate
        self.entropy = entropy
        self.hack_gold_drop = hack_gold_drop
        self.base: dict | None = None  # first rollout's length, distinct_2, entropy
        self.best: dict | None = None  # the held-out eval with the best gold accuracy so far: step, score, gold
        self.active: set[str] = set()  # alarms currently raised (to report each once when it starts)
        self.events: list[dict] = []  # every alarm when it was first raised: step, alarm, message

    # -- per rollout ----------------------------------------------------------
    def observe_step(self, step: int, m: dict) -> list[dict]:
        """Check one rollout's metrics (keys: kl, response_length, distinct_2, eos_rate, entropy)."""
        if self.base is None:
            self.base = {k: m[k] for k in ("response_length", "distinct_2", "entropy")}
        b = self.base
        found: dict[str, str] = {}
        if m["kl"] < -self.negative_kl:
            found["negative_kl"] = (f"mean KL to the reference is {m['kl']:.3f} nats (< -{self.negative_kl}); "
                                    "a KL below zero points to a broken estimate or a policy exploiting it")
        if b["response_length"] > 0:
            drift = m["response_length"] / b["response_length"] - 1
            if abs(drift) > self.length_drift:
                found["length_drift"] = (f"mean response length {m['response_length']:.2f} tokens vs "
                                         f"{b['response_length']:.2f} at the start ({100 * drift:+.0f}%)")
        if b["distinct_2"] > 0 and m["distinct_2"] < self.distinct * b["distinct_2"]:
            found["repetition"] = (f"distinct-2 {m['distinct_2']:.3f} vs {b['distinct_2']:.3f} at the start: "
                                   "responses are repeating themselves")
        if m["eos_rate"] < self.eos_rate:
            found["eos_rate"] = f"only {100 * m['eos_rate']:.0f}% of responses end with EOS (< {100 * self.eos_rate:.0f}%)"
        if b["entropy"] > 0 and m["entropy"] < self.entropy * b["entropy"]:
            found["entropy_collapse"] = (f"per-token entropy {m['entropy']:.4f} vs {b['entropy']:.4f} at the start: "
                                         "the policy has collapsed")
        return self._raise(step, found, kinds=("negative_kl", "length_drift", "repetition", "eos_rate", "entropy_collapse"))

    # -- per held-out evaluation ------------------------------------------------
    def observe_eval(self, step: int, score: float, gold: float | None) -> list[dict]:
        """Flag reward hacking: gold accuracy fell `hack_gold_drop` below its best while the score rose above its value then."""
        if gold is None:
            return []
        found: dict[str, str] = {}
        if self.best is None or gold >= self.best["gold"]:
            self.best = {"step": step, "score": score, "gold": gold}
        elif gold < self.best["gold"] - self.hack_gold_drop and score > self.best["score"]:
            found["reward_hacking"] = (
                f"reward hacking: held-out RM score {self.best['score']:.2f} -> {score:.2f} while gold accuracy "
                f"{100 * self.best['gold']:.1f}% -> {100 * gold:.1f}% (since step {self.best['step']}); "
                "raise kl_coef or improve the reward model")
        return self._raise(step, found, kinds=("reward_hacking",))

    # -- bookkeeping --------------------------------------------------------------
    def _raise(self, step: int, found: dict[str, str], kinds: tuple[str, ...]) -> list[dict]:
        new = []
        for kind in kinds:
            if kind in found and kind not in self.active:
                ev = {"step": step, "alarm": kind, "message": found[kind]}
                self.events.append(ev)
                new.append(ev)
        self.active = (self.active - set(kinds)) | set(found)
        return new

    @property
    def hacking(self) -> bool:
        return any(e["alarm"] == "reward_hacking" for e in self.events)

    def state_dict(self) -> dict:
        return {"base": self.base, "best": self.best, "active": sorted(self.active), "events": self.events}

    def load_state_dict(self, s: dict) -> None:
        self.base, self.best, self.active, self.events = s["base"], s["best"], set(s["active"]), list(s["events"])
