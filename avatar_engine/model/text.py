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


class PromptEncoder:
    """`encode(texts)` → (token embeddings [N, 77, D], pooled [N, P] for SDXL else None)."""

    def __init__(self, pipe, capacity: int = 512):
        self.pipe = pipe
        self.capacity = capacity
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.hits = self.misses = 0

    def _encode_new(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pipe = self.pipe
        device = pipe._execution_device
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return [(embeds[i:i + 1], pooled[i:i + 1]) for i in range(len(texts))]
        embeds, _ = pipe.encode_prompt(texts, device, 1, False)
        return [(embeds[i:i + 1], None) for i in range(len(texts))]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        texts = list(texts)
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

    def pipeline_kwargs(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict:
        """prompt_embeds / negative_prompt_embeds (+ pooled for SDXL) for one pipeline call."""
        pos, pos_pooled = self.encode(prompts)
        neg, neg_pooled = self.encode(negatives)
        kwargs = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        if pos_pooled is not None:
            kwargs.update(pooled_prompt_embeds=pos_pooled, negative_pooled_prompt_embeds=neg_pooled)
        return kwargs
