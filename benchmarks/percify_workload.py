"""Percify workload for engine_throughput.py: N percify requests over real photos of seven
people (scikit-image's astronaut and the six faces of insightface's t1.jpg), and the naive
peer's setup (the same FaceID weights loaded into its own plain pipeline with diffusers'
`load_ip_adapter`, one call per request with `ip_adapter_image_embeds`).

What the engine side includes: reference-photo face analysis happens in the warm-up call and
is cached by photo content afterwards (as for a user re-sending photos); per-output similarity
scoring is off (`score_outputs=False`) because the naive peer does not score either. Both
sides get the same identity embeddings, so the comparison is denoising + decode only.
"""
from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
import torch

PROMPTS = ["as a cyberpunk hero", "as a medieval knight", "as an astronaut", "as a jazz musician",
           "as a renaissance noble", "as an elf archer", "as a deep sea diver", "as a samurai"]
# Crops of insightface's t1.jpg (1280x886) holding exactly one face each.
T1_CROPS = [(0, 180, 260, 470), (850, 0, 1070, 260), (690, 290, 890, 520), (400, 200, 620, 470),
            (1080, 220, 1280, 450), (230, 90, 420, 300)]


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@lru_cache(maxsize=1)
def reference_photos() -> list[bytes]:
    """JPEG bytes of seven different people, one face each."""
    import insightface
    import skimage.data
    from PIL import Image

    group = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))
    return [_jpeg(Image.fromarray(skimage.data.astronaut()))] + [_jpeg(group.crop(box)) for box in T1_CROPS]


def make_percify_requests(n: int, model: str | None = None, steps: int | None = None,
                          identity_strength: float = 0.8):
    """n percify requests, cycling through seven people and eight prompts; fixed seeds."""
    from avatar_engine.requests import PercifyRequest

    photos = reference_photos()
    return [PercifyRequest(prompt=f"portrait {PROMPTS[i % len(PROMPTS)]}", photos=[photos[i % len(photos)]],
                           identity_strength=identity_strength, seed=2000 + i, model=model, steps=steps,
                           score_outputs=False)
            for i in range(n)]


def naive_percify_setup(engine, naive_pipe, resolved):
    """Load the profile's FaceID weights into the plain pipeline the way diffusers documents
    (`load_ip_adapter`, which installs IP-Adapter processors and the LoRA through peft), left
    switched on, and return `call_kwargs(request) -> dict` giving that request's
    `ip_adapter_image_embeds` ([2, 1, 512] under CFG, the shape diffusers' docs use)."""
    from avatar_engine.model.adapters import TINY_LORA_RANK, checkpoint_path, read_checkpoint, tiny_faceid_state_dict

    first = resolved[0]
    profile = engine.profile(first.model)
    src = profile.ip_adapter
    state = (tiny_faceid_state_dict(naive_pipe.unet, lora_rank=src.lora_rank or TINY_LORA_RANK) if src.tiny
             else read_checkpoint(checkpoint_path(src, profile.name, download=True)))
    naive_pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
    naive_pipe.set_ip_adapter_scale(first.identity_strength)
    task = engine._tasks["percify"]
    embeddings = {}
    for r in resolved:
        key = id(r.photos[0]) if r.photos else id(r)
        if key not in embeddings:
            embeddings[key] = (task.analyze(r.photos, profile.face_min_size).embedding if r.photos
                               else np.asarray(r.identity_embedding, np.float32))
    by_seed = {r.seed: embeddings[id(r.photos[0]) if r.photos else id(r)] for r in resolved}
    device, dtype = naive_pipe.device, naive_pipe.unet.dtype

    def call_kwargs(r) -> dict:
        emb = torch.from_numpy(by_seed[r.seed]).reshape(1, 1, -1)
        if r.guidance_scale > 1:
            emb = torch.cat([torch.zeros_like(emb), emb])
        return {"ip_adapter_image_embeds": [emb.to(device=device, dtype=dtype)]}

    return call_kwargs
