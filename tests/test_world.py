"""The built-in world: held-out problems stay out of every split; the gold checker is exact."""

import random

from lifecycle.data import world


def test_heldout_never_in_training_data():
    train, held = world.splits()
    assert len(held) == world.N_HELDOUT and len(train) + len(held) == 10_000
    held_set = set(held)
    assert not held_set & set(train)
    # SFT, reward and PPO training prompts avoid held-out problems.
    for ex in world.sft_examples(1500):
        assert world.parse_problem(ex["prompt"][0]["content"]) not in held_set
    for p in world.reward_problems(2000):
        assert p not in held_set
    for ex in world.ppo_prompts(500):
        assert world.parse_problem(ex["prompt"][0]["content"]) not in held_set
    # Pretraining sentences never state a held-out sum.
    import re

    held_pairs = {(p.a, p.b) for p in held}
    for doc in world.pretrain_documents(2000, seed=3):
        for a, b in re.findall(r"(\d+) (?:plus|and) (\d+)", doc):
            assert (int(a), int(b)) not in held_pairs


def test_documents_state_correct_sums_and_are_deterministic():
    docs = world.pretrain_documents(200, seed=5)
    assert docs == world.pretrain_documents(200, seed=5)
    assert docs != world.pretrain_documents(200, seed=6)
    import re

    for d in docs:
        for a, b, c in re.findall(r"(\d+) (?:plus|and) (\d+)(?: equals| to get| is| \? it is) (\d+)", d):
            assert int(a) + int(b) == int(c)


def test_split_is_independent_of_stage_seed():
    assert world.heldout_problems() == world.heldout_problems()
    assert world.sft_examples(10, seed=0, heldout=True)[0]["prompt"] == world.sft_examples(10, seed=9, heldout=True)[0]["prompt"]


def test_sloppy_labeller_error_rate():
    ex = world.sft_examples(1500, seed=0)
    wrong_carry, carry, wrong_plain = 0, 0, 0
    for e in ex:
        p = world.parse_problem(e["prompt"][0]["content"])
        ans = int(e["completion"][0]["content"])
        if p.has_carry:
            carry += 1
            wrong_carry += ans != p.answer
            assert ans in (p.answer, p.answer - 10)
        else:
            wrong_plain += ans != p.answer
    assert wrong_plain == 0
    # 60% of carry problems mislabelled, within sampling error (carry share is 45%).
    assert abs(wrong_carry / carry - world.SLOPPY_RATE) < 0.06


def test_gold_checker():
    q = "what is 48 plus 87 ?"
    assert world.gold_check(q, "135")
    assert world.gold_check("<|user|>" + q + "<|assistant|>", " 135 ")
    assert not world.gold_check(q, "135", ended=False)  # no EOS: wrong
    assert not world.gold_check(q, "125")
    assert not world.gold_check(q, "1355")
    assert not world.gold_check(q, "135 .")
    assert not world.gold_check(q, "")


def test_preference_pairs():
    probs = world.reward_problems(200)
    pairs = world.preference_pairs(probs)
    for p, pair in zip(probs, pairs):
        assert world.gold_check(p.question, pair["chosen"][0]["content"])
        assert not world.gold_check(p.question, pair["rejected"][0]["content"])
    # With the policy's own samples: a correct sample is chosen, a wrong one rejected.
    p = world.Problem(48, 87)
    pair = world.preference_pairs([p], samples=[["125", "135"]])[0]
    assert pair["chosen"][0]["content"] == "135" and pair["rejected"][0]["content"] == "125"
    pair = world.preference_pairs([p], samples=[["99", "98"]])[0]
    assert pair["chosen"][0]["content"] == "135" and pair["rejected"][0]["content"] == "99"


def test_perturb_is_wrong_and_nonnegative():
    rng = random.Random(0)
    for p in world.splits()[0][:2000]:
        w = world.perturb(p, rng)
        assert w != p.answer and w >= 0
