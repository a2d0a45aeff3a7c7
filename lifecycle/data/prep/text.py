"""Pure per-document functions of `llm data`: normalisation, words and n-grams, PII scrubbing, quality rules.

Nothing here reads files or keeps state, so every function can run in a worker
process (or on another machine) on any shard of documents and give the same
answer. No torch.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------
_SPACES = re.compile(r"[^\S\n]+")      # runs of whitespace other than newlines
_BLANKS = re.compile(r"\n\s*\n\s*")    # a paragraph break, however many blank lines
_CONTROL = {c for c in map(chr, range(32)) if c not in "\n\t"} | {"\x7f", "\u200b", "\ufeff"}


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode `form` (NFC, NFKC or none), no control characters, spaces collapsed, lines right-stripped,
    paragraphs separated by exactly one blank line, no leading or trailing whitespace."""
    if form.upper() != "NONE":
        text = unicodedata.normalize(form.upper(), text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if any(c in text for c in _CONTROL):
        text = "".join(" " if c in _CONTROL else c for c in text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def text_hash(text: str) -> bytes:
    """16-byte digest of a (normalised) document: the key of exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


_WORD = re.compile(r"\w+", re.UNICODE)


def match_words(text: str) -> list[str]:
    """Lower-cased words without punctuation, NFKC-folded, split on any whitespace (line breaks included):
    the view of a text that deduplication and decontamination compare, so reflowed or re-punctuated
    copies of a text look the same."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def ngrams(words: list[str], n: int) -> list[str]:
    """Word n-grams joined by one space; a text shorter than n gives itself as its only n-gram."""
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


# ---------------------------------------------------------------------------
# PII: typed placeholders
# ---------------------------------------------------------------------------
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# North-American style (optional +1, area code in brackets or not) and international (+CC then 7-13 digits),
# with spaces, dots or dashes between groups.
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?1[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]\d{4}"
    r"|\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r")(?!\w)"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of payment-card numbers: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return PLACEHOLDERS["credit_card"] if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def _ipv6(m: re.Match) -> str:
    try:
        ipaddress.IPv6Address(m.group())
    except ValueError:
        return m.group()
    return PLACEHOLDERS["ip"]


def _phone(m: re.Match) -> str:
    return PLACEHOLDERS["phone"] if 10 <= sum(c.isdigit() for c in m.group()) <= 15 else m.group()


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Replace e-mail addresses, payment-card numbers (Luhn-checked), IPv4/IPv6 addresses and phone numbers
    with typed placeholders; return the text and the count per type.

    Cards go first (a 16-digit card would otherwise read as a phone number), then
    addresses, then phones, so each span is replaced once.
    """
    counts: Counter = Counter()
    for kind, pattern, repl in (("email", _EMAIL, lambda m: PLACEHOLDERS["email"]), ("credit_card", _CARD, _card),
                                ("ip", _IPV4, lambda m: PLACEHOLDERS["ip"]), ("ip", _IPV6, _ipv6),
                                ("phone", _PHONE, _phone)):
        def sub(m: re.Match, repl=repl, kind=kind) -> str:
            out = repl(m)
            if out != m.group():
                counts[kind] += 1
            return out

        text = pattern.sub(sub, text)
    return text, counts


# ---------------------------------------------------------------------------
# Quality: the Gopher rules
# ---------------------------------------------------------------------------
# Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
# appendix A (MassiveText quality filters and repetition removal, table A1).
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "◦", "‣", "⁃", "-", "*", "–", "—")
ELLIPSES = ("...", "…")


@dataclass(frozen=True)
class GopherRules:
    """Thresholds of the Gopher quality and repetition rules. Their defaults (the paper's) and help are
    DataConfig's fields; `lifecycle.data.prep.pipeline.gopher_rules(cfg)` builds this from a config."""

    min_words: int
    max_words: int
    min_mean_word_length: float
    max_mean_word_length: float
    max_symbol_word_ratio: float
    max_bullet_lines: float
    max_ellipsis_lines: float
    min_alpha_words: float
    min_stop_words: int
    max_dup_line_fraction: float
    max_dup_paragraph_fraction: float
    max_dup_line_chars: float
    max_dup_paragraph_chars: float
    top_ngram_chars: dict
    dup_ngram_chars: dict


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    parts = [p for p in parts if p.strip()]
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for p in parts:
        if p in seen:
            dup_n += 1
            dup_chars += len(p)
        seen.add(p)
    return dup_n / len(parts), dup_chars / max(1, sum(len(p) for p in parts))


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters in all occurrences of the most frequent word n-gram / characters in all words."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in words))


def dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by an n-gram that occurs more than once / characters in all words
    (each word counted once, however many repeated n-grams cover it)."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if counts[tuple(words[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(len(w) for w in words))


def gopher_reasons(text: str, rules: GopherRules) -> list[str]:
    """The names of the rules `text` breaks (empty: it passes). Words are whitespace-separated tokens."""
    words = text.split()
    n = len(words)
    why = []
    if not rules.min_words <= n <= rules.max_words:
        why.append("word_count")
    if n == 0:
        return why
    mean = sum(len(w) for w in words) / n
    if not rules.min_mean_word_length <= mean <= rules.max_mean_word_length:
        why.append("mean_word_length")
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if symbols / n > rules.max_symbol_word_ratio:
        why.append("symbol_word_ratio")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines and sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > rules.max_bullet_lines:
        why.append("bullet_lines")
    if lines and sum(ln.rstrip().endswith(ELLIPSES) for ln in lines) / len(lines) > rules.max_ellipsis_lines:
        why.append("ellipsis_lines")
    if sum(any(c.isalpha() for c in w) for w in words) / n < rules.min_alpha_words:
        why.append("alpha_words")
    lowered = [w.lower().strip(".,;:!?\"'()") for w in words]
    if sum(w in STOP_WORDS for w in lowered) < rules.min_stop_words:
        why.append("stop_words")
    line_frac, line_chars = _dup_fractions(text.split("\n"))
    para_frac, para_chars = _dup_fractions(text.split("\n\n"))
    if line_frac > rules.max_dup_line_fraction or line_chars > rules.max_dup_line_chars:
        why.append("duplicate_lines")
    if para_frac > rules.max_dup_paragraph_fraction or para_chars > rules.max_dup_paragraph_chars:
        why.append("duplicate_paragraphs")
    if any(top_ngram_char_fraction(lowered, k) > v for k, v in rules.top_ngram_chars.items()):
        why.append("top_ngram")
    if any(dup_ngram_char_fraction(lowered, k) > v for k, v in rules.dup_ngram_chars.items()):
        why.append("duplicate_ngrams")
    return why


def parse_ngram_thresholds(spec: str) -> dict[int, float]:
    """"2:0.20,3:0.18" -> {2: 0.2, 3: 0.18}; raises ValueError on anything else."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        n, _, frac = part.partition(":")
        out[int(n)] = float(frac)
        if out[int(n)] < 0 or int(n) < 1:
            raise ValueError(part)
    return out
