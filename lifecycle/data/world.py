"""The built-in world: two-digit addition, small enough to learn on 2 CPU cores.

Every stage draws from this one deterministic world:

* pretraining: documents of templated sentences stating correct sums
  ("48 plus 87 equals 135 ."), in several phrasings;
* SFT: chat pairs ("what is 48 plus 87 ?" -> "135") written by a *sloppy
  labeller* who forgets the carry from the units on most carry problems, so the
  SFT model learns a systematic error and leaves headroom for RLHF;
* reward modelling: preference pairs (chosen = correct, rejected = wrong);
* PPO: prompts;
* a gold checker that says whether a response is exactly right, so that we can
  tell a policy that truly improves from one that fools the reward model.

The 500 held-out problems never appear in any training split, pretraining
included. The split depends only on WORLD_SEED, never on a stage's --seed, so
every stage agrees on what is held out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

WORLD_SEED = 20240611
N_HELDOUT = 500
SLOPPY_RATE = 0.6  # chance the labeller forgets the carry on a carry problem

TEMPLATES = (
    "{a} plus {b} equals {c} .",
    "the sum of {a} and {b} is {c} .",
    "what is {a} plus {b} ? it is {c} .",
    "add {a} and {b} to get {c} .",
)
QUESTION = "what is {a} plus {b} ?"
_QUESTION_RE = re.compile(r"what is (\d{1,2}) plus (\d{1,2}) \?")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def has_carry(self) -> bool:
        return self.a % 10 + self.b % 10 >= 10

    @property
    def question(self) -> str:
        return QUESTION.format(a=self.a, b=self.b)


def splits() -> tuple[list[Problem], list[Problem]]:
    """(train, heldout): all 10,000 problems, 500 held out from every stage."""
    problems = [Problem(a, b) for a in range(100) for b in range(100)]
    rng = random.Random(WORLD_SEED)
    rng.shuffle(problems)
    return problems[N_HELDOUT:], problems[:N_HELDOUT]


# ---------------------------------------------------------------------------
# Pretraining corpus
# ---------------------------------------------------------------------------
def pretrain_documents(n_docs: int, seed: int = 0, sentences: int = 4) -> list[str]:
    """`n_docs` documents of `sentences` correct sums each, from training problems only."""
    train, _ = splits()
    rng = random.Random(seed * 1_000_003 + 1)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(sentences):
            p = rng.choice(train)
            parts.append(rng.choice(TEMPLATES).format(a=p.a, b=p.b, c=p.answer))
        docs.append(" ".join(parts))
    return docs


def heldout_documents(n_docs: int = 500, sentences: int = 4) -> list[str]:
    """Evaluation documents built only from held-out problems (fixed, seed-independent)."""
    _, heldout = splits()
    rng = random.Random(WORLD_SEED + 7)
    docs = []
    for i in range(n_docs):
        parts = []
        for j in range(sentences):
            p = heldout[(i * sentences + j) % len(heldout)]
            parts.append(rng.choice(TEMPLATES).format(a=p.a, b=p.b, c=p.answer))
        docs.append(" ".join(parts))
    return docs


# ---------------------------------------------------------------------------
# SFT, preferences, prompts
# ---------------------------------------------------------------------------
def sloppy_answer(p: Problem, rng: random.Random) -> int:
    """What the sloppy labeller writes: on carry problems it forgets the carry SLOPPY_RATE of the time."""
    if p.has_carry and rng.random() < SLOPPY_RATE:
        return p.answer - 10
    return p.answer


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sft_examples(n: int = 1500, seed: int = 0, heldout: bool = False) -> list[dict]:
    """Prompt/completion chat pairs labelled by the sloppy labeller.

    The training split takes `n` training problems; the held-out split
    (`heldout=True`) labels the held-out problems the same way, for eval loss.
    """
    train, held = splits()
    rng = random.Random(seed * 7919 + (2 if heldout else 1))
    pool = held if heldout else rng.sample(train, min(n, len(train)))
    return [
        {"prompt": [user(p.question)], "completion": [assistant(str(sloppy_answer(p, rng)))]}
        for p in pool[:n]
    ]


def perturb(p: Problem, rng: random.Random) -> int:
    """A plausible wrong answer: the dropped carry where there is one, else an off-by-small error."""
    if p.has_carry and rng.random() < 0.5:
        return p.answer - 10
    while True:
        wrong = p.answer + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong >= 0 and wrong != p.answer:
            return wrong


def preference_pairs(problems: list[Problem], seed: int = 0, samples: list[list[str]] | None = None) -> list[dict]:
    """Chosen/rejected pairs judged by the gold checker.

    `samples[i]` are the policy's own responses to problems[i] (the SFT model
    sampled at temperature 1, say): chosen is a correct sample, else the gold
    answer; rejected is a wrong sample, else a perturbation of the answer. With
    no samples, chosen is the gold answer and rejected a perturbation.
    """
    rng = random.Random(seed * 104729 + 3)
    pairs = []
    for i, p in enumerate(problems):
        own = samples[i] if samples is not None else []
        right = [s for s in own if gold_check(p.question, s)]
        wrong = [s for s in own if not gold_check(p.question, s) and s.strip()]
        chosen = right[0] if right else str(p.answer)
        rejected = wrong[0] if wrong else str(perturb(p, rng))
        pairs.append({"prompt": [user(p.question)], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]})
    return pairs


def reward_problems(n: int = 2000, seed: int = 0) -> list[Problem]:
    train, _ = splits()
    return random.Random(seed * 31 + 11).sample(train, min(n, len(train)))


def heldout_problems(n: int = N_HELDOUT) -> list[Problem]:
    return splits()[1][:n]


def ppo_prompts(n: int = 4000, seed: int = 0, heldout: bool = False) -> list[dict]:
    """Conversational prompts for PPO rollouts (training problems) or evaluation (held-out)."""
    train, held = splits()
    pool = held if heldout else random.Random(seed * 17 + 5).sample(train, min(n, len(train)))
    return [{"prompt": [user(p.question)]} for p in pool[:n]]


# ---------------------------------------------------------------------------
# The gold checker
# ---------------------------------------------------------------------------
def parse_problem(prompt: str) -> Problem | None:
    """Find "what is A plus B ?" in a prompt (raw user text or a chat-rendered string)."""
    m = _QUESTION_RE.search(prompt)
    return Problem(int(m.group(1)), int(m.group(2))) if m else None


def gold_check(prompt: str, response: str, ended: bool = True) -> bool:
    """True iff the response is exactly the decimal sum and the model ended it (emitted EOS).

    `response` is the decoded text of the response tokens without special
    tokens; `ended` says whether generation stopped on EOS rather than on the
    length limit. Surrounding whitespace is ignored; anything else is wrong.
    """
    p = parse_problem(prompt)
    if p is None:
        raise ValueError(f"not a built-in world prompt: {prompt!r}")
    return ended and response.strip() == str(p.answer)
