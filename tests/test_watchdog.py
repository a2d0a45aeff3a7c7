"""The PPO watchdog on hand-made metric sequences (pure Python)."""

from lifecycle.watchdog import Watchdog


def dog():
    return Watchdog(negative_kl=0.2, length_drift=0.5, distinct=0.5, eos_rate=0.5, entropy=0.1, hack_gold_drop=0.05)


def healthy(**kw):
    m = {"kl": 0.3, "response_length": 4.0, "distinct_2": 0.6, "eos_rate": 1.0, "entropy": 0.5}
    m.update(kw)
    return m


def test_quiet_on_a_healthy_run_then_each_symptom_once():
    d = dog()
    assert d.observe_step(1, healthy(kl=0.0)) == []
    assert d.observe_step(2, healthy(kl=0.8, entropy=0.2, response_length=3.5)) == []
    cases = {
        "negative_kl": healthy(kl=-0.5),
        "length_drift": healthy(response_length=7.0),  # +75%
        "repetition": healthy(distinct_2=0.2),
        "eos_rate": healthy(eos_rate=0.3),
        "entropy_collapse": healthy(entropy=0.01),
    }
    for i, (kind, m) in enumerate(cases.items()):
        raised = d.observe_step(10 + i, m)
        assert [a["alarm"] for a in raised] == [kind]
        assert d.observe_step(20 + i, m) == []  # reported once while it lasts
        assert d.observe_step(30 + i, healthy()) == []  # and clears
    assert [e["alarm"] for e in d.events] == list(cases)


def test_reward_hacking_score_up_gold_down():
    d = dog()
    assert d.observe_eval(0, score=3.3, gold=0.67) == []
    assert d.observe_eval(25, score=4.0, gold=0.70) == []  # both up: fine, new best
    assert d.observe_eval(50, score=3.9, gold=0.60) == []  # both down: no hacking signal
    raised = d.observe_eval(75, score=6.0, gold=0.55)  # score above its value at the best, gold 15 points below
    assert [a["alarm"] for a in raised] == ["reward_hacking"] and d.hacking
    assert "70.0% -> 55.0%" in raised[0]["message"]
    assert d.observe_eval(100, score=8.5, gold=0.48) == []  # still hacking: not repeated


def test_no_gold_no_hacking_check_and_state_roundtrip():
    d = dog()
    assert d.observe_eval(0, score=1.0, gold=None) == []
    d.observe_step(1, healthy())
    d.observe_eval(5, 1.0, 0.5)
    d2 = dog()
    d2.load_state_dict(d.state_dict())
    assert d2.state_dict() == d.state_dict()
    assert d2.observe_eval(10, 2.0, 0.3)[0]["alarm"] == "reward_hacking"
