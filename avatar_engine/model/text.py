"""Text conditioning with a cache of text-encoder outputs.

Avatar traffic repeats text: every style preset shares its template words, most requests share
the negative prompt, and cast encodes the scene prompt once per character region. Each distinct
string is encoded once (as the pipeline itself would, SDXL's two encoders included) and kept
in an LRU cache per model, so a call encodes only the strings it has not seen.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from .styles.stacked import select

Row = tuple[int, float]  # a text's style LoRA: (adapter index, scale); (0, 0.0): none


class PromptEncoder:
    """`encode(texts)` → (token embeddings [N, 77, D], pooled [N, P] for SDXL else None).

    With style LoRAs that train the text encoders, `encode(texts, styles)` encodes each text
    with its row's LoRA (rows of different styles in one encoder call) and caches it under
    (text, adapter, scale); `text_adapters` are the adapters that have text-encoder layers."""

    def __init__(self, pipe, capacity: int = 512):
        self.pipe = pipe
        self.capacity = capacity
        self._cache: OrderedDict = OrderedDict()
        self.hits = self.misses = 0
        self.text_adapters: frozenset = frozenset()

    def _key(self, text: str, row: Row | None):
        if row is None or row[0] not in self.text_adapters or row[1] == 0:
            return text
        return (text, row[0], round(float(row[1]), 6))

    def _encode_new(self, keys: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        texts = [k if isinstance(k, str) else k[0] for k in keys]
        rows = [(0, 0.0) if isinstance(k, str) else (k[1], k[2]) for k in keys]
        selections = [s for s in (getattr(getattr(self.pipe, part, None), "avatar_styles", None)
                                  for part in ("text_encoder", "text_encoder_2")) if s is not None]
        try:
            for sel in selections:
                select(sel, rows, 1, self.pipe._execution_device, self.pipe.text_encoder.dtype)
            return self._run_encoders(texts)
        finally:
            for sel in selections:
                sel.reset()

    def _run_encoders(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pipe = self.pipe
        device = pipe._execution_device
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return [(embeds[i:i + 1], pooled[i:i + 1]) for i in range(len(texts))]
        embeds, _ = pipe.encode_prompt(texts, device, 1, False)
        return [(embeds[i:i + 1], None) for i in range(len(texts))]

    def encode(self, texts: Sequence[str], styles: Sequence[Row] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        texts = [self._key(t, r) for t, r in zip(texts, styles or [None] * len(texts))]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        found = dict(zip(missing, self._encode_new(missing))) if missing else {}
        rows = []
        for t in texts:
            if t in found:
                rows.append(found[t])
            else:
                self._cache.move_to_end(t)
                rows.append(self._cache[t])
        for t, value in found.items():
            if self.capacity:
                self._cache[t] = value
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        embeds = torch.cat([r[0] for r in rows])
        pooled = torch.cat([r[1] for r in rows]) if rows[0][1] is not None else None
        return embeds, pooled

    def pipeline_kwargs(self, prompts: Sequence[str], negatives: Sequence[str],
                        styles: Sequence[Row] | None = None) -> dict:
        """prompt_embeds / negative_prompt_embeds (+ pooled for SDXL) for one pipeline call; the
        negative prompt is encoded with the row's style LoRA too, as with a merged LoRA."""
        pos, pos_pooled = self.encode(prompts, styles)
        neg, neg_pooled = self.encode(negatives, styles)
        kwargs = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        if pos_pooled is not None:
            kwargs.update(pooled_prompt_embeds=pos_pooled, negative_pooled_prompt_embeds=neg_pooled)
        return kwargs
