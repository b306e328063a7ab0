"""Content policy: a configurable word list matched on normalised text, plus an output hook.

Normalisation defeats the cheap evasions: Unicode compatibility forms (NFKC: fullwidth letters,
ligatures), case (casefold), accents (NFKD + drop combining marks), leetspeak digits/symbols
(`n4k3d` → `naked`), and separators inside a word (`n.a.k.e.d`, `n-a-k-e-d`). Matching is on
word boundaries so `sextant` or `Essex` do not trip `sex`. Multi-word entries match across any
run of non-letters.

The output side is a hook: `PolicyChecker(output_checker=fn)` where `fn(images) -> list[bool]`
flags unsafe images (e.g. a diffusers safety checker); the worker fails such jobs with
`content_policy_violation`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

_LEET = str.maketrans({
    "0": "o", "1": "i", "!": "i", "|": "i", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s",
    "7": "t", "+": "t", "8": "b", "9": "g", "€": "e", "£": "l",
})


def normalise(text: str) -> str:
    """Lower-case ASCII-ish letters and single spaces; see the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    # Fold leet characters only when they touch a letter, so "4 cats" stays "4 cats".
    # Symbols fold only before a letter ("$ex", "n@ked"), so trailing punctuation ("abuse!") stays.
    for _ in range(2):  # twice: "n4k3d" has leet characters on both sides of a letter
        text = re.sub(r"(?<=[^\W\d_])[0-9]|[0-9](?=[^\W\d_])|[!|@$+€£](?=[^\W\d_])",
                      lambda m: m.group(0).translate(_LEET), text)
    # Collapse single letters separated by dots/dashes/underscores/spaces: "n.a.k.e.d" → "naked".
    text = re.sub(r"\b(?:[^\W\d_][\s._\-*]){2,}[^\W\d_]\b",
                  lambda m: re.sub(r"[\s._\-*]", "", m.group(0)), text)
    text = re.sub(r"[\W_]+", " ", text)
    return text.strip()


@dataclass(frozen=True)
class PolicyViolation:
    param: str
    term: str


class PolicyChecker:
    """Checks request text against the word list; holds the optional image checker."""

    def __init__(self, words: Iterable[str],
                 output_checker: Callable[[Sequence[object]], Sequence[bool]] | None = None):
        terms = sorted({normalise(w) for w in words if normalise(w)}, key=len, reverse=True)
        self.terms = tuple(terms)
        if terms:
            alternation = "|".join(r"\s+".join(map(re.escape, t.split())) for t in terms)
            # Allow a plural/verb "s"/"es" so "nudes" matches "nude".
            self._pattern: re.Pattern[str] | None = re.compile(rf"(?<![^\W_])(?:{alternation})(?:e?s)?(?![^\W_])")
        else:
            self._pattern = None
        self.output_checker = output_checker

    def find(self, text: str | None) -> str | None:
        """The first listed term in `text`, or None."""
        if not text or self._pattern is None:
            return None
        m = self._pattern.search(normalise(text))
        return m.group(0) if m else None

    def check_fields(self, fields: Iterable[tuple[str, str | None]]) -> PolicyViolation | None:
        """First violation among (param, text) pairs."""
        for param, text in fields:
            term = self.find(text)
            if term:
                return PolicyViolation(param=param, term=term)
        return None

    def check_images(self, images: Sequence[object]) -> list[bool]:
        """True for each image the output checker flags; all False without a checker."""
        if self.output_checker is None or not images:
            return [False] * len(images)
        flags = list(self.output_checker(images))
        if len(flags) != len(images):
            raise ValueError("output checker must return one flag per image")
        return [bool(f) for f in flags]
