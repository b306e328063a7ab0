"""Prompt builder: user prompt + style preset template + negative prompt, fitted into the
text encoders' 77-token windows.

The user's words have priority: when the composed prompt is too long, style words are
dropped first, then the user's prompt is cut, and the report lists every dropped word so
callers can show it (CLIP otherwise truncates silently).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .styles import BUILTIN_STYLES, StylePack

#: The built-in styles' (template, negative) pairs; a profile's styles are style packs (styles.py).
STYLE_TEMPLATES: dict[str, tuple[str, str]] = {name: (p.template, p.negative) for name, p in BUILTIN_STYLES.items()}
BASE_NEGATIVE = "worst quality, low quality"
WINDOW = 77  # CLIP context incl. BOS/EOS


@dataclass
class BuiltPrompt:
    prompt: str
    negative_prompt: str
    truncated: bool = False
    dropped_words: list[str] = field(default_factory=list)  # from the user's prompt
    dropped_style_words: list[str] = field(default_factory=list)
    token_counts: dict[str, int] = field(default_factory=dict)  # per tokenizer, incl. BOS/EOS

    def report(self) -> dict:
        return {"prompt": self.prompt, "negativePrompt": self.negative_prompt, "truncated": self.truncated,
                "droppedWords": self.dropped_words, "droppedStyleWords": self.dropped_style_words,
                "tokens": self.token_counts}


def _words(words: list[str]) -> list[str]:
    """Template words as reported (without the template's commas), whichever step dropped them."""
    return [w.strip(",") for w in words if w.strip(",")]


class PromptBuilder:
    """Composes prompts for one pipeline; `tokenizers` are the pipeline's CLIP tokenizers
    (one for SD1.5, two for SDXL). The tightest window of all of them is respected. `styles`:
    the profile's style packs (default: the built-ins)."""

    def __init__(self, tokenizers: Sequence, window: int = WINDOW, styles: Mapping[str, StylePack] | None = None):
        self.tokenizers = [t for t in tokenizers if t is not None]
        self.window = window
        self.styles = dict(BUILTIN_STYLES if styles is None else styles)

    def count(self, text: str) -> int:
        """Largest token count (incl. BOS/EOS) over the tokenizers."""
        return max(len(t(text, truncation=False, add_special_tokens=True).input_ids) for t in self.tokenizers)

    def _fits(self, text: str) -> bool:
        return self.count(text) <= self.window

    def _fit_words(self, words: list[str], compose) -> tuple[list[str], list[str]]:
        """Longest prefix of `words` for which compose(prefix) fits (binary search)."""
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(compose(words[:mid])):
                lo = mid
            else:
                hi = mid - 1
        return words[:lo], words[lo:]

    def build(self, prompt: str, style_preset: str | None = None, negative_prompt: str | None = None) -> BuiltPrompt:
        user = " ".join(prompt.split())
        pack = self.styles.get(style_preset or "")
        template, style_negative = (pack.template, pack.negative) if pack is not None else ("{prompt}", "")
        head, _, tail = template.partition("{prompt}")
        negatives = [n for n in (negative_prompt, style_negative, BASE_NEGATIVE) if n]
        negative, dropped_neg = self._fit_negative(", ".join(negatives))

        composed = f"{head}{user}{tail}"
        if self._fits(composed):
            return self._result(composed, negative, [], [])
        # 1) drop style words from the end of the template tail, then its head.
        tail_words = tail.split()
        kept_tail, dropped_tail = self._fit_words(tail_words, lambda w: f"{head}{user} {' '.join(w)}".strip())
        composed = f"{head}{user} {' '.join(kept_tail)}".strip()
        if self._fits(composed):
            return self._result(composed, negative, [], _words(dropped_tail))
        # 2) style head goes too; 3) then the user's prompt is cut at a word boundary.
        dropped_style = head.split() + dropped_tail + kept_tail
        user_words = user.split()
        kept, dropped = self._fit_words(user_words, lambda w: " ".join(w))
        return self._result(" ".join(kept), negative, dropped, _words(dropped_style))

    def _fit_negative(self, negative: str) -> tuple[str, list[str]]:
        if self._fits(negative):
            return negative, []
        kept, dropped = self._fit_words(negative.split(), lambda w: " ".join(w))
        return " ".join(kept), dropped

    def _result(self, prompt: str, negative: str, dropped: list[str], dropped_style: list[str]) -> BuiltPrompt:
        return BuiltPrompt(prompt=prompt, negative_prompt=negative, truncated=bool(dropped), dropped_words=dropped,
                           dropped_style_words=dropped_style, token_counts={"prompt": self.count(prompt)})
