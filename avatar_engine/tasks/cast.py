"""Cast: one scene with 2-4 characters, each with its own prompt and (optionally) its own face.

Design: ONE denoising pass with a region per character, not per-character renders composited
afterwards.
- Consistency: every character is denoised in the same latent with the same scene, lighting,
  perspective and noise, so people share one light source and one floor; composited renders
  each invent their own and need inpainting to hide the seams.
- Cost: one pass costs the same UNet steps as a plain image (the extra is K+1 small text
  attentions per cross-attention layer); compositing costs K+1 passes plus a blend pass.
- Identity confinement: users of InstantID / IP-Adapter report that several faces given to one
  adapter blend into one face or only one survives. Here each character's identity tokens (of the
  request's identity method: FaceID, FaceID Plus v2 with that character's face crop, or InstantID)
  enter under their own region mask, so identity k is added only inside region k (InstantID: its
  IdentityNet also runs per character on that character's keypoints drawn in its region, with its
  own tokens, and its residuals are multiplied by the region mask); its prompt is applied only there too (regional cross-attention, see
  model/regional.py), and the scene prompt fills the background. A character without photos is
  prompt-only: its identity mask is zero, which changes the output by exactly 0.0.

Layout: explicit normalised boxes per character, or automatic (columns for landscape/square,
stacked rows for portrait frames with 3-4 people) with margins and gaps.

Report: a `CastReport` (`result.report`, reports.py) gives each character's region, whether it had an
identity, and how similar the face found for it in the output is. Output faces are matched
one-to-one to the references by optimal assignment on similarity (Hungarian algorithm), not
by position, so a swapped or merged identity is visible: `foundInRegion` then names another
character's region, or the similarity is low / null.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..identity_methods import needs_photos
from ..model.adapters import identity_adapter, keypoint_images, kps_in_box
from ..model.attention import MAX_CHARACTERS, conditioned
from ..model.regional import region_masks, regional_conditioning
from ..prompts import BuiltPrompt
from ..requests import CAST_CHARACTERS_RANGE, EMBEDDING_DIM, CastRequest, GenerationRequest, GenerationResult, Box
from ..requests.common import load_photo, normed_embedding
from ..requests.layout import pixel_box
from ..runtime.optimize import set_vae_slicing
from ..runtime.scheduler import LoadedModel, Task, WorkItem, uses_cfg
from .identity import match_faces
from .reports import CastReport, CharacterReport

assert CAST_CHARACTERS_RANGE[1] == MAX_CHARACTERS, "the attention layout pads casts to MAX_CHARACTERS"
_NO_MATCH = {"similarity": None, "distance": None, "sameIdentity": None, "faceBox": None, "foundInRegion": None}


def _region_of(point: tuple[float, float], pixel_boxes: Sequence[tuple[int, int, int, int]]) -> int | None:
    x, y = point
    hits = [j for j, (x0, y0, x1, y1) in enumerate(pixel_boxes) if x0 <= x < x1 and y0 <= y < y1]
    return hits[0] if hits else None


def identity_report(scorer, images: Sequence[Any], references: Sequence[np.ndarray | None],
                    pixel_boxes: Sequence[tuple[int, int, int, int]]) -> tuple[list[list[dict]], list[int]]:
    """Per character, per image: the output face matched to its reference (one-to-one, least
    total scorer distance), the scorer's similarity/distance/verdict, and which region the face
    lies in. `references` are scorer descriptors (IdentityServices.scoring_reference). Also the
    number of faces the scorer detected per image."""
    per_char: list[list[dict]] = [[] for _ in references]
    counts = []
    for image in images:
        faces = scorer.describe(image)
        counts.append(len(faces))
        for i, (fi, m) in enumerate(match_faces(scorer, references, [f.descriptor for f in faces])):
            if fi is None:
                per_char[i].append(dict(_NO_MATCH))
                continue
            x0, y0, x1, y1 = faces[fi].bbox
            region = _region_of(((x0 + x1) / 2, (y0 + y1) / 2), pixel_boxes)
            per_char[i].append({**m.to_json(), "faceBox": [round(float(v), 1) for v in faces[fi].bbox],
                                "foundInRegion": region})
    return per_char, counts


# ---------------------------------------------------------------------------------------
# task

@dataclass
class CastPlan:
    """Everything one cast request needs per image, computed once in prepare()."""

    layout: str
    boxes: list[Box]
    pixel_boxes: list[tuple[int, int, int, int]]
    masks: torch.Tensor  # [K, H, W] pixel weights
    embeddings: list[np.ndarray | None]
    sources: list[str | None]  # "photos" | "embedding" | None
    references: list[Any]  # identity.IdentityConditioning | None (cached, shared: do not mutate)
    scene: BuiltPrompt
    region_prompts: list[BuiltPrompt]

    @property
    def has_identity(self) -> bool:
        return any(e is not None for e in self.embeddings)


class CastTask(Task):
    name = "cast"
    regional = True

    def prepare(self, model: LoadedModel, request: CastRequest) -> CastPlan:
        width, height = request.width, request.height
        layout, boxes = request.region_boxes()
        embeddings: list[np.ndarray | None] = []
        sources: list[str | None] = []
        references: list[Any] = []
        for i, c in enumerate(request.characters):
            if c.photos:
                images = [load_photo(ph, f"characters[{i}].photos[{j}]") for j, ph in enumerate(c.photos)]
                ref = self.engine.identity.analyze(images, model.profile.face_min_size,
                                                   param=f"characters[{i}].photos",
                                                   crops=needs_photos(request.identity_method))
                embeddings.append(np.asarray(ref.embedding, np.float32))
                sources.append("photos")
                references.append(ref)
            elif c.identity_embedding is not None:
                embeddings.append(normed_embedding(c.identity_embedding, f"characters[{i}].identityEmbedding"))
                sources.append("embedding")
                references.append(None)
            else:
                embeddings.append(None)
                sources.append(None)
                references.append(None)
        if request.uses_identity:
            identity_adapter(model, request.identity_method)  # loaded at load; fails here, before any call, if none
        builder = model.prompt_builder
        scene = builder.build(request.prompt, request.style_preset, request.negative_prompt)
        # A region's prompt is the character followed by the scene: the person keeps the scene's
        # setting and style, and the character's words survive when the window is tight.
        region_prompts = [builder.build(f"{c.prompt}, {request.prompt}", request.style_preset, request.negative_prompt)
                          for c in request.characters]
        return CastPlan(layout=layout, boxes=boxes, pixel_boxes=[pixel_box(b, width, height) for b in boxes],
                        masks=region_masks(boxes, width, height), embeddings=embeddings, sources=sources,
                        references=references, scene=scene, region_prompts=region_prompts)

    def items(self, model: LoadedModel, request: CastRequest, index: int, plan: CastPlan) -> list[WorkItem]:
        # The scene prompt was built in prepare(); do not tokenize it again.
        return [WorkItem(index, i, seed, plan.scene, plan) for i, seed in enumerate(request.image_seeds())]

    def group_key(self, request: GenerationRequest) -> tuple:
        """The base key plus the identity method. Every cast runs the same padded layout
        (MAX_CHARACTERS slots, identity strength per image), so casts of 2-4 characters, with or
        without faces, share calls."""
        return super().group_key(request) + (request.identity_method,)

    def run(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem],
            callback: Callable | None) -> list:
        first: CastRequest = requests[items[0].request_index]  # type: ignore[assignment]
        pipe = model.pipe
        plans: list[CastPlan] = [it.conditioning for it in items]
        b, slots = len(items), MAX_CHARACTERS + 1
        cfg = uses_cfg(model, first.guidance_scale)
        # Unused character slots repeat the scene prompt (cached) under a zero weight.
        texts = [t for plan in plans for t in [plan.scene.prompt] + [p.prompt for p in plan.region_prompts]
                 + [plan.scene.prompt] * (MAX_CHARACTERS - len(plan.region_prompts))]
        # One style per image (its scene and character prompts alike); a style per character is not offered.
        pos, pos_pooled = model.prompts.encode(texts, [it.style for it in items for _ in range(slots)])
        neg, neg_pooled = model.prompts.encode([plan.scene.negative_prompt for plan in plans], [it.style for it in items])
        tokens, dim = pos.shape[1], pos.shape[2]
        kwargs: dict[str, Any] = dict(
            prompt_embeds=pos.reshape(b, slots * tokens, dim),
            negative_prompt_embeds=neg.repeat(1, slots, 1),
            num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
            generator=[torch.Generator(device="cpu").manual_seed(it.seed) for it in items],
            callback_on_step_end=callback, height=first.height, width=first.width,
        )
        if pos_pooled is not None:  # SDXL: the scene prompt's pooled embedding drives the global conditioning
            kwargs["pooled_prompt_embeds"] = pos_pooled.reshape(b, slots, -1)[:, 0]
            kwargs["negative_pooled_prompt_embeds"] = neg_pooled

        def padded(plan: CastPlan) -> tuple[torch.Tensor, list]:
            k = plan.masks.shape[0]
            masks = torch.cat([plan.masks, plan.masks.new_zeros(MAX_CHARACTERS - k, *plan.masks.shape[1:])])
            return masks, plan.embeddings + [None] * (MAX_CHARACTERS - k)

        masks, embeddings = zip(*(padded(plan) for plan in plans))
        masks = torch.stack(masks)  # [B, MAX_CHARACTERS, H, W]
        has_face = torch.tensor([[e is not None for e in embs] for embs in embeddings])
        both = (lambda t: torch.cat([t, t])) if cfg else (lambda t: t)
        scale = getattr(pipe, "vae_scale_factor", 8)
        values = regional_conditioning(both(masks), both(has_face), (first.height // scale, first.width // scale),
                                       len(pipe.unet.down_blocks), model.device, model.dtype)
        adapter = None
        if first.identity_method is not None:
            adapter = identity_adapter(model, first.identity_method)
        control = contextlib.nullcontext()
        if adapter is not None:  # faces always present in the layout; zero where absent
            zeros = np.zeros(EMBEDDING_DIM, np.float32)
            clip = None
            if adapter.needs_crops:  # Plus v2: each character's face crops through CLIP (blank where none)
                clip = adapter.clip_embeds([[ref.crops if ref is not None else None for ref in plan.references]
                                            + [None] * (MAX_CHARACTERS - len(plan.references)) for plan in plans], cfg)
            values["faces"] = adapter.tokens([np.stack([e if e is not None else zeros for e in embs])
                                              for embs in embeddings], cfg, clip_embeds=clip)
            strengths = [requests[it.request_index].identity_strength if plan.has_identity else 0.0
                         for it, plan in zip(items, plans)]
            values.update(adapter.weights(strengths, cfg))
            values["method"] = adapter.method
            if adapter.identitynet is not None:  # InstantID: each face's keypoints in its region, residuals masked
                control = adapter.identitynet.applied(
                    pipe.unet, values["faces"], self._keypoints(plans, first, model, cfg),
                    adapter.control_weights([requests[it.request_index].identity_strength for it in items], cfg),
                    masks=both(masks * has_face[:, :, None, None]).to(model.device),
                    active=[bool(has_face[:, k].any()) for k in range(MAX_CHARACTERS)])
        set_vae_slicing(pipe, len(items), model.profile.speed)
        with conditioned(pipe.unet, mode="regional", **values), control:
            return pipe(**kwargs).images

    @staticmethod
    def _keypoints(plans: Sequence[CastPlan], first: CastRequest, model: LoadedModel, cfg: bool) -> torch.Tensor:
        """[N, MAX_CHARACTERS, 3, H, W]: character k's face keypoints (its reference photo's, or
        a frontal face) drawn inside its region, one image per character slot."""
        per_image = []
        for plan in plans:
            row = []
            for k in range(MAX_CHARACTERS):
                if k >= len(plan.embeddings) or plan.embeddings[k] is None:
                    row.append(None)
                    continue
                ref = plan.references[k]
                row.append(kps_in_box(ref.kps if ref is not None else None, plan.boxes[k], first.width, first.height))
            per_image.append(row)
        return keypoint_images(per_image, first.width, first.height, model.device, model.dtype, cfg)

    def finalize(self, model: LoadedModel, result: GenerationResult, plan: CastPlan) -> None:
        request: CastRequest = result.request  # type: ignore[assignment]
        identity = self.engine.identity
        scorer = identity.scorer
        references = [identity.scoring_reference(ref, emb) for ref, emb in zip(plan.references, plan.embeddings)]
        if any(e is not None for e in references):
            per_char, counts = identity_report(scorer, result.images, references, plan.pixel_boxes)
        else:
            per_char, counts = [[dict(_NO_MATCH) for _ in result.images] for _ in references], []
        characters = []
        for i, c in enumerate(request.characters):
            sims = [m["similarity"] for m in per_char[i] if m["similarity"] is not None]
            ref = plan.references[i]
            characters.append(CharacterReport(
                index=i, prompt=c.prompt, region_prompt=plan.region_prompts[i].prompt,
                dropped_words=plan.region_prompts[i].dropped_words,  # cut to fit the 77-token window
                box=[round(v, 4) for v in plan.boxes[i]], pixel_box=list(plan.pixel_boxes[i]),
                has_identity=plan.embeddings[i] is not None, identity_source=plan.sources[i],
                reference_photos=len(c.photos),
                reference_consistency=round(float(ref.consistency), 4) if ref is not None else None,
                notes=list(ref.notes) if ref is not None else [],
                similarity=round(float(np.mean(sims)), 4) if sims else None,
                same_identity=all(m["sameIdentity"] for m in per_char[i] if m["sameIdentity"] is not None)
                if sims else None,
                images=per_char[i]))
        result.report = CastReport(characters=characters, scorer=scorer.info(), layout=plan.layout,
                                   identity_strength=request.identity_strength,
                                   identity_method=request.identity_method if plan.has_identity else None,
                                   faces_detected=counts or None)
