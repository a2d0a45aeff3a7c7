"""lifecycle.rl against values worked out by hand (the arithmetic is written out in each test)."""

import math

import pytest
import torch

from lifecycle import rl


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_logprobs_and_entropy():
    logits = torch.log(t([0.25, 0.75], [0.5, 0.5])).unsqueeze(0)  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    lp = rl.logprobs_from_logits(logits, tokens)
    assert torch.allclose(lp, torch.log(t([0.75, 0.5])))
    # H([.25, .75]) = -(.25 ln .25 + .75 ln .75) = 0.5623; H([.5, .5]) = ln 2
    h = rl.entropy_from_logits(logits)
    assert torch.allclose(h, t([0.562335, math.log(2)]), atol=1e-5)
    # temperature 2 on logits [0, ln 3]: softmax([0, ln3/2]) = [1, √3]/(1+√3)
    lp2 = rl.logprobs_from_logits(torch.tensor([[[0.0, math.log(3)]]]), torch.tensor([[1]]), temperature=2.0)
    assert lp2.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def test_gae_by_hand():
    # γ=1, λ=0.5, r = [0, 0, 1], V = [.5, .6, .7]
    # δ2 = 1 + 0 - .7 = .3          A2 = .3
    # δ1 = 0 + .7 - .6 = .1         A1 = .1 + .5·.3  = .25
    # δ0 = 0 + .6 - .5 = .1         A0 = .1 + .5·.25 = .225
    adv, ret = rl.gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.225, 0.25, 0.3]))
    assert torch.allclose(ret, t([0.725, 0.85, 1.0]))
    # Padding after the response is ignored: γ=.9, λ=1, r = [1, 2, pad], V = [.5, 1, pad]
    # δ1 = 2 + 0 - 1 = 1            A1 = 1
    # δ0 = 1 + .9·1 - .5 = 1.4      A0 = 1.4 + .9·1 = 2.3
    adv, ret = rl.gae(t([1, 2, 99]), t([0.5, 1.0, 99]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, t([2.3, 1.0, 0.0]))
    assert torch.allclose(ret, t([2.8, 2.0, 0.0]))


def test_masked_mean_var_whiten():
    x, m = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    assert rl.masked_mean(x, m).item() == pytest.approx(2.0)
    # unbiased: ((1-2)² + 0 + (3-2)²) / (3-1) = 1
    assert rl.masked_var(x, m).item() == pytest.approx(1.0)
    assert rl.masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = rl.masked_whiten(x, m)
    assert torch.allclose(w, t([-1, 0, 1, 0]), atol=1e-6)
    # shift_mean=False keeps the mean: (x - 2)/1 + 2
    assert torch.allclose(rl.masked_whiten(x, m, shift_mean=False), t([1, 2, 3, 0]), atol=1e-6)
    # per-row means
    assert torch.allclose(rl.masked_mean(t([1, 3], [5, 7]), t([1, 1], [1, 0]), dim=1), t(2, 5))


def test_clipped_surrogate_at_known_ratios():
    # ε = 0.2; four tokens: (ρ, A) = (1.5, +1), (0.5, +1), (1.5, -1), (0.5, -1)
    # max(-Aρ, -A clip(ρ)):  max(-1.5, -1.2) = -1.2 (clipped)   max(-0.5, -0.8) = -0.5
    #                        max( 1.5,  1.2) =  1.5             max( 0.5,  0.8) =  0.8 (clipped)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15, clip fraction 2/4
    ratio = t([1.5, 0.5, 1.5, 0.5])
    old = torch.zeros(1, 4)
    adv = t([1, 1, -1, -1])
    loss, st = rl.policy_loss(torch.log(ratio), old, adv, torch.ones(1, 4), clip=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    # approx KL: mean of (ρ-1) - ln ρ = 2·(.5 - ln 1.5) + 2·(-.5 - ln .5), / 4
    expect = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4
    assert st["approx_kl"].item() == pytest.approx(expect, abs=1e-6)
    # at ρ = 1 the loss is -mean(A) and its gradient is -A/n
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = rl.policy_loss(logp, torch.zeros(1, 2), t([2.0, -1.0]), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert torch.allclose(logp.grad, t([-1.0, 0.5]))


def test_clipped_value_loss():
    # token 1: V_old 0, V .5, R 1 -> (V-R)² = .25; clipped V = .2 -> (.2-1)² = .64; max .64
    # token 2: V_old 0, V .1, R -1 -> 1.21 both ways
    # loss = ½ (.64 + 1.21) / 2 = .4625; clip active on 1 of 2 tokens
    loss, st = rl.value_loss(t([0.5, 0.1]), t([0.0, 0.0]), t([1.0, -1.0]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.4625)
    assert st["vf_clipfrac"].item() == pytest.approx(0.5)
    loss, _ = rl.value_loss(t([0.5, 0.1]), t([0.0, 0.0]), t([1.0, -1.0]), torch.ones(1, 2), clip=0.0)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.21) / 2)


def test_kl_estimators():
    # π(a) = .5, π_ref(a) = .25: log r = ln .5
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert rl.kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert rl.kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert rl.kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    # Unbiased: π = [.5, .5], π_ref = [.25, .75];
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = 0.143841; the π-weighted mean of k1 and of k3 equals it.
    kl = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    lp, ref = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75]))
    for est in ("k1", "k3"):
        assert (0.5 * rl.kl_estimate(lp, ref, est)).sum().item() == pytest.approx(kl, abs=1e-6)
    with pytest.raises(ValueError):
        rl.kl_estimate(lp, ref, "k9")


def test_kl_shaped_rewards():
    # β = .1; row 0: kl = [-1 - -1.5, 0, (pad)] = [.5, 0, 0]; score 2 lands on token 1 (the last one)
    # rewards = [-.05, 2, 0];  row 1: one token, kl = 0, score -1 -> [-1, 0, 0]
    score = t(2.0, -1.0)
    logp = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0])
    ref = t([-1.5, -2.0, -2.0], [-1.0, -5.0, -5.0])
    mask = t([1, 1, 0], [1, 0, 0])
    r, kl = rl.kl_shaped_rewards(score, logp, ref, mask, beta=0.1)
    assert torch.allclose(r, t([-0.05, 2.0, 0.0], [-1.0, 0.0, 0.0]))
    assert torch.allclose(kl, t([0.5, 0.0, 0.0], [0.0, 0.0, 0.0]))


def test_adaptive_kl_controller():
    # β=.1, target 6, horizon 10000, batch 128.
    # KL 9: e = clip(9/6 - 1) = clip(.5) = .2 -> β = .1 (1 + .2·128/10000) = .100256
    c = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 128) == pytest.approx(0.100256)
    # KL 5.7: e = -.05 -> β = .100256 (1 - .05·.0128) = .100256·.99936
    assert c.update(5.7, 128) == pytest.approx(0.100256 * 0.99936)
    c2 = rl.AdaptiveKLController(1.0, 1.0, 1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value and c2.target == 6.0
    f = rl.FixedKLController(0.15)
    assert f.update(100.0, 128) == 0.15


def test_explained_variance_and_text_stats():
    r, m = t([1, 2, 3]), torch.ones(1, 3)
    assert rl.explained_variance(r, r, m).item() == pytest.approx(1.0)
    assert rl.explained_variance(torch.zeros(1, 3) + 2, r, m).item() == pytest.approx(0.0)
    # 2-grams of [1,2,1,2] and [1,2]: (1,2),(2,1),(1,2),(1,2) -> 2 distinct of 4
    assert rl.distinct_n([[1, 2, 1, 2], [1, 2]], 2) == 0.5
    assert rl.distinct_n([[1]], 2) == 1.0
    assert rl.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert rl.pearson([1, 2, 3], [1, 1, 1]) == 0.0


def test_logprobs_refuse_logits_that_do_not_match_the_tokens():
    """gather accepts a smaller index than its input: logits for more positions than tokens would be read silently."""
    with pytest.raises(ValueError, match="do not match"):
        rl.logprobs_from_logits(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def _expected_kl_loss_gradient(z: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_{a~π}[∇_z k(a)] with π = softmax(z) held fixed as the sampling distribution, summed exactly over actions."""
    V = z.shape[0]
    p = torch.softmax(z, 0).detach()
    g = torch.zeros(V)
    for a in range(V):
        zz = z.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(zz, 0)[a].view(1, 1)
        rl.kl_loss(logp, ref[a].view(1, 1), torch.ones(1, 1), estimator).backward()
        g += p[a] * zz.grad
    return g


def test_kl_loss_gradients_are_the_kls_they_claim():
    """Tang & Munos 2025: in the loss, k3 gives ∇KL(π_ref||π), k2 gives ∇KL(π||π_ref), k1 nothing (refused).
    Checked exactly: the π-weighted sum of per-action gradients against autograd of the closed-form KLs."""
    z = torch.tensor([0.3, -1.2, 0.8, 0.0])
    ref = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.4]), 0)
    zz = z.clone().requires_grad_(True)
    logp = torch.log_softmax(zz, 0)
    forward = (logp.exp() * (logp - ref)).sum()  # KL(π || π_ref)
    reverse = (ref.exp() * (ref - logp)).sum()  # KL(π_ref || π)
    g_fwd, = torch.autograd.grad(forward, zz, retain_graph=True)
    g_rev, = torch.autograd.grad(reverse, zz)
    assert torch.allclose(_expected_kl_loss_gradient(z, ref, "k3"), g_rev, atol=1e-6)
    assert torch.allclose(_expected_kl_loss_gradient(z, ref, "k2"), g_fwd, atol=1e-6)
    assert not torch.allclose(g_fwd, g_rev, atol=1e-3)  # the two really differ here
    with pytest.raises(ValueError, match="zero expected gradient"):
        rl.kl_loss(logp.view(1, 4), ref.view(1, 4), torch.ones(1, 4), "k1")
    # its value: the masked token mean of the estimator
    lp, rf, m = t([-1.0, -2.0]), t([-1.5, -2.0]), t([1.0, 0.0])
    assert rl.kl_loss(lp, rf, m, "k2").item() == pytest.approx(0.5 * 0.5**2)


def test_reward_normalisation_and_the_missing_eos_penalty_by_hand():
    """Scores 1, 2, 3, 6: mean 3, unbiased std sqrt(14/3); the second response never ended and loses one unit.
    The normalisation is the first rollout's and stays fixed: a later batch is read on the same scale."""
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    ended = torch.tensor([True, False, True, True])
    norm = rl.score_normalisation(scores)
    sd = math.sqrt(14 / 3)
    assert norm["mean"] == pytest.approx(3.0) and norm["std"] == pytest.approx(sd)
    r = rl.normalised_scores(scores, norm, ended, missing_eos_penalty=1.0)
    assert torch.allclose(r, torch.tensor([-2 / sd, -1 / sd - 1.0, 0.0, 3 / sd]))
    later = rl.normalised_scores(torch.tensor([3.0 + sd]), norm, torch.tensor([True]), 1.0)
    assert later.item() == pytest.approx(1.0)
    assert rl.score_normalisation(torch.tensor([2.0, 2.0])) == {"mean": 2.0, "std": 1.0}  # constant: no division by 0
    assert rl.score_normalisation(scores, normalize=False) == {"mean": 0.0, "std": 1.0}
    assert torch.equal(rl.normalised_scores(scores, {"mean": 0.0, "std": 1.0}, ended, 0.0), scores)
