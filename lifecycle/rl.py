"""The math of PPO for language models, as small pure functions (no models, no I/O).

`Rollout` is the batch of experience they work on, its fields grouped by
their RL meaning with shape comments (as OpenRLHF's `Experience`).
Each function takes tensors and returns tensors; the PPO loop in
`lifecycle/stages/ppo.py` calls them in order. Shapes follow one convention:
B sequences, T response tokens, V vocabulary; `mask` is (B, T) with 1 on the
response tokens that exist (up to and including EOS) and 0 on the padding after
them. Padding is always trailing: row i has its tokens at 0..len_i-1.

References
- [PPO]  Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy
  Optimization Algorithms", arXiv:1707.06347 (clipped surrogate, eq. 7).
- [GAE]  Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional
  Continuous Control Using Generalized Advantage Estimation", ICLR
  (eqs. 11-16).
- [Ziegler] Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving
  2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593
  (KL-shaped reward, sec. 2.2; adaptive KL coefficient, sec. 2.2 eq. 2).
- [InstructGPT] Ouyang et al. 2022, "Training language models to follow
  instructions with human feedback", arXiv:2203.02155 (the RLHF objective,
  eq. 2: RM score minus β·log(π/π_ref)).
- [k3] Schulman 2020, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html (the k1, k2, k3 estimators).
- [GRPO] Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
  Reasoning in Open Language Models", arXiv:2402.03300 (k3 as a loss term, eq. 4).
- [Tang & Munos] Tang, Munos 2025, "On a few pitfalls in KL divergence gradient
  estimation for RL" (which gradient each estimator gives).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# The rollout: one process's batch of experience, grouped by RL meaning
# ---------------------------------------------------------------------------


@dataclass
class Rollout:
    """B episodes; P prompt positions (left-padded); T response positions (right-padded after the stop token).
    Position t of a response is the action a_t; the state s_t is the prompt and a_<t."""

    # what was sampled
    prompt_ids: torch.Tensor  # (B, P) long, prompt tokens, left-padded with pad
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, sampled tokens, the stop token included when emitted, then pad
    response_mask: torch.Tensor  # (B, T) float, 1 on response tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool, the response emitted a stop token
    # what the four roles said about it (filled in by the rollout)
    logprobs: torch.Tensor  # (B, T) log π_old(a_t|s_t), the actor at sampling time
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t), the critic at sampling time
    scores: torch.Tensor  # (B,) raw reward-model score of prompt+response
    # what PPO computes from it
    rewards: torch.Tensor  # (B, T) shaped rewards: -β·KL_t, plus the normalised score on the last token
    kl: torch.Tensor  # (B, T) per-token KL estimate log π_old - log π_ref (zero on padding)
    advantages: torch.Tensor  # (B, T) GAE advantages, whitened
    returns: torch.Tensor  # (B, T) GAE returns, the critic's targets

    @classmethod
    def sampled(cls, prompt_ids, prompt_mask, response_ids, response_mask, ended) -> "Rollout":
        """A rollout holding only what was sampled; every other field zeros of its shape."""
        z = torch.zeros_like(response_mask)
        return cls(prompt_ids, prompt_mask, response_ids, response_mask, ended, z, z, z,
                   torch.zeros(response_ids.shape[0], device=response_ids.device), z, z, z, z)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The episodes `idx` (a (b,) index tensor), every field sliced on its first dimension."""
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids), each (B, P+T), for prompt+response.

        Position ids count real tokens only, as generation with left padding does, so a
        forward pass sees the same positions the sampler saw.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        mask = torch.cat([self.prompt_mask, self.response_mask.long()], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def at_responses(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, P+T, ...) per-position outputs -> (B, T, ...): what predicts a_t sits at position P+t-1."""
        P, T = self.prompt_ids.shape[1], self.response_ids.shape[1]
        return per_position[:, P - 1 : P + T - 1]


# ---------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(a_t | s_t) of the tokens taken.

    logits: (B, T, V) the model's scores for the token at each position
    tokens: (B, T) the tokens actually taken
    returns (B, T) log-probabilities under softmax(logits / temperature), the
    distribution the tokens were sampled from.
    """
    # gather accepts an index smaller than its input and would quietly read the wrong positions
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match the tokens {tuple(tokens.shape)} they score")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H(π(·|s_t)) = logsumexp(z) - Σ softmax(z)·z, per position: (B, T, V) -> (B, T)."""
    z = logits.float() / temperature
    p = F.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions; unbiased (divides by n-1) by default."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / n.clamp(min=1)
    if unbiased:
        if n <= 1:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions come back as 0.

    Whitening the advantages per batch is the standard PPO practice (it makes the
    policy step independent of the reward scale). With shift_mean=False only the
    scale is changed (used for rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)


# ---------------------------------------------------------------------------
# KL to the reference and the shaped reward
# ---------------------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π [k3].

    With log r = log π_ref(a|s) - log π(a|s) for a ~ π:
      k1 = -log r                (unbiased, can be negative per token)
      k2 = (log r)^2 / 2         (biased, low variance, never negative)
      k3 = (r - 1) - log r       (unbiased, never negative)
    All three have expectation ≈ KL when π and π_ref are close; k1 and k3 are
    exactly unbiased *in value*. The sequence KL is the sum over the response tokens.
    Their gradients differ: as a reward, only k1's policy gradient is ∇KL(π||π_ref);
    see `kl_loss` for each one as a loss term.
    """
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """KL to the reference as a loss term, E_t[k(a_t)] over the response tokens, differentiated through logp
    (GRPO's form, Shao et al. 2024, eq. 4, with k3). For tokens a ~ π the expected gradients are
    (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"):

      k3 = ρ - 1 - log ρ (ρ = π_ref/π):  ∇k3 = (1 - ρ) ∇log π,  E_π = ∇KL(π_ref || π)   (the reverse KL)
      k2 = ½ (log π - log π_ref)²:     ∇k2 = log(π/π_ref) ∇log π,  E_π = ∇KL(π || π_ref)
      k1 = log π - log π_ref:          ∇k1 = ∇log π,                E_π = 0  (no regularisation at all)

    so k1 is refused here. As a *reward* (`kl_shaped_rewards`) only k1 gives KL(π||π_ref)'s policy gradient.
    """
    if estimator == "k1":
        raise ValueError("k1 as a loss term has zero expected gradient; use k3 (GRPO) or k2")
    return masked_mean(kl_estimate(logp, ref_logp, estimator), mask)


def score_normalisation(scores: torch.Tensor, normalize: bool = True) -> dict:
    """{"mean", "std"} that put the reward model's scores on a unit scale: the first rollout's mean and
    (unbiased) standard deviation, then held fixed for the whole run, so that a score keeps one meaning
    while the policy improves (Ziegler et al. 2019 normalise the reward model once, before RL, in the
    same way). A constant batch or a single score gives std 1; `normalize=False` the identity."""
    if not normalize:
        return {"mean": 0.0, "std": 1.0}
    sd = scores.std().item() if scores.numel() > 1 else 1.0
    return {"mean": scores.mean().item(), "std": sd if sd > 1e-6 else 1.0}


def normalised_scores(scores: torch.Tensor, norm: dict, ended: torch.Tensor, missing_eos_penalty: float) -> torch.Tensor:
    """The episode reward r(x, y): (score - mean) / std, minus `missing_eos_penalty` for a response that was
    cut at max_new_tokens before its end marker (TRL's old PPOTrainer's missing_eos_penalty, on the
    normalised scale here)."""
    return (scores - norm["mean"]) / norm["std"] - missing_eos_penalty * (~ended).float()


def kl_shaped_rewards(
    score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β·KL_t, plus the sequence score on the last response token.

    This is the reward of [Ziegler] sec. 2.2 and [InstructGPT] eq. 2,
    R(x, y) = r_φ(x, y) - β log(π(y|x) / π_ref(y|x)), spread over tokens: the
    log-ratio term is paid where each token is chosen, the reward model's score
    arrives when the response ends.

    score: (B,) sequence scores;  logp, ref_logp, mask: (B, T)
    returns (rewards (B, T), kl (B, T)), both zero on padding.
    """
    mask = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last response token
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += score.to(rewards.dtype)
    return rewards * mask, kl


# ---------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation [GAE] eqs. 11-16.

      δ_t = r_t + γ V(s_{t+1}) - V(s_t)        (V after the last token is 0: the episode ends)
      A_t = Σ_l (γλ)^l δ_{t+l} = δ_t + γλ A_{t+1}
      returns_t = A_t + V(s_t)                  (the critic's regression target, TD(λ))

    rewards, values, mask: (B, T), padding trailing. Returns (advantages, returns), (B, T), zero on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]  # nothing flows back from the padding into the real tokens
        adv[:, t] = last
    returns = adv + values
    return adv * mask, returns * mask


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate of [PPO] eq. 7, negated to be minimised, averaged over tokens.

      ρ_t = π(a_t|s_t) / π_old(a_t|s_t)
      L = -E_t[ min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t) ]

    Returns (loss, stats) with stats["clipfrac"] (share of tokens where the clip is
    active) and stats["approx_kl"] = E[(ρ-1) - log ρ], the k3 estimate of
    KL(π_old || π) used to stop an epoch early.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: ½ E_t[ max((V - R)^2, (V_old + clip(V - V_old, -ε, ε) - R)^2) ].

    The value clip keeps the critic near the values that produced the advantages,
    as PPO's reference implementation does (Schulman et al. 2017, OpenAI
    baselines ppo2); clip <= 0 turns it off.
    """
    err = (values - returns) ** 2
    if clip > 0:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    else:
        loss = 0.5 * masked_mean(err, mask)
        frac = torch.zeros((), dtype=values.dtype, device=values.device)
    return loss, {"vf_clipfrac": frac.detach()}


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class FixedKLController:
    """β held constant."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of [Ziegler] sec. 2.2 (eq. 2).

      e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
      β_{t+1} = β_t (1 + K_β e_t),   K_β = n_steps / horizon

    KL_t is the mean per-sequence KL of the batch just collected and n_steps
    the number of episodes (sequences) in it; the paper uses K_β = 0.1 per
    update with horizon = 10 × batch size.
    """

    def __init__(self, beta: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(beta), float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


# ---------------------------------------------------------------------------
# Text statistics (for the watchdog)
# ---------------------------------------------------------------------------


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
    Conversation Models"): unique n-grams / all n-grams over a set of token sequences.
    Falls towards 0 when the policy repeats itself. Returns 1.0 when there are no n-grams."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation of two equal-length lists (0 when either is constant)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)
