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
  regional.py), and the scene prompt fills the background. A character without photos is
  prompt-only: its identity mask is zero, which changes the output by exactly 0.0.

Layout: explicit normalised boxes per character, or automatic (columns for landscape/square,
stacked rows for portrait frames with 3-4 people) with margins and gaps.

Report: `result.extra["characters"]` gives each character's region, whether it had an
identity, and how similar the face found for it in the output is. Output faces are matched
one-to-one to the references by optimal assignment on similarity (Hungarian algorithm), not
by position, so a swapped or merged identity is visible: `foundInRegion` then names another
character's region, or the similarity is low / null.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .adapters import FACEID_EMBED_DIM as EMBEDDING_DIM
from .engine import LoadedModel, Task, WorkItem
from .errors import RequestValidationError
from .identity import (NEEDS_PHOTOS, analyze_references, check_identity_method, check_photo_types, load_photo,
                       normed_embedding, refuse_other_people)
from .prompts import BuiltPrompt
from .attention import MAX_CHARACTERS, conditioned
from .regional import LAYOUTS, Box, auto_layout, box_overlap, pixel_box, region_masks, regional_conditioning
from .requests import (CAST_CHARACTERS_RANGE, IDENTITY_STRENGTH_RANGE, MAX_REFERENCE_PHOTOS, PROMPT_MAX_CHARS,
                       GenerationRequest, GenerationResult)
from .speed import set_vae_slicing

log = logging.getLogger(__name__)

MIN_BOX_SIDE = 0.1  # a region narrower or lower than 10 % of the frame cannot hold a person
MAX_BOX_OVERLAP = 0.25  # intersection / smaller box; more and two people share one region
DEFAULT_IDENTITY_STRENGTH = 0.8  # as percify-yourself
assert CAST_CHARACTERS_RANGE[1] == MAX_CHARACTERS, "the attention layout pads casts to MAX_CHARACTERS"


def _fail(param: str, message: str) -> RequestValidationError:
    return RequestValidationError(message, param=param)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class CastCharacter:
    """One person in a cast scene.

    prompt: what this person looks like / does (applied inside their region).
    photos: 0..5 reference photos (PIL images or encoded bytes) of this person.
    identity_embedding: a precomputed 512-d face embedding instead of photos (e.g. the face of
    an existing avatar). Without photos and embedding the character is prompt-only.
    box: optional region (x0, y0, x1, y1), normalised to 0..1 of the frame."""

    prompt: str
    photos: list = field(default_factory=list)
    identity_embedding: Any = None
    box: Sequence[float] | None = None

    @property
    def has_identity(self) -> bool:
        return bool(self.photos) or self.identity_embedding is not None

    def validate(self, i: int) -> None:
        p = f"characters[{i}]"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise _fail(f"{p}.prompt", f"{p}.prompt must be a non-empty string")
        if len(self.prompt) > PROMPT_MAX_CHARS:
            raise _fail(f"{p}.prompt", f"{p}.prompt must be at most {PROMPT_MAX_CHARS} characters")
        if not isinstance(self.photos, (list, tuple)) or len(self.photos) > MAX_REFERENCE_PHOTOS:
            raise _fail(f"{p}.photos",
                        f"{p}.photos must be a list of at most {MAX_REFERENCE_PHOTOS} photos of one person")
        check_photo_types(self.photos, f"{p}.photos")
        refuse_other_people(self.photos, f"{p}.photos")  # photos of two people: 400 at submit, naming one
        if self.identity_embedding is not None:
            if self.photos:
                raise _fail(f"{p}.identityEmbedding", f"{p}: give photos or identityEmbedding, not both")
            normed_embedding(self.identity_embedding, f"{p}.identityEmbedding")
        if self.box is not None:
            validate_box(self.box, f"{p}.box")


def validate_box(box: Any, param: str) -> Box:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise _fail(param, f"{param} must be four numbers [x0, y0, x1, y1] in 0..1")
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        raise _fail(param, f"{param} {list(box)} lies outside the frame; coordinates are fractions 0..1")
    if x1 <= x0 or y1 <= y0:
        raise _fail(param, f"{param} {list(box)} is empty: x1 must exceed x0 and y1 must exceed y0")
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise _fail(param, f"{param} {list(box)} is too small: each side must be at least {MIN_BOX_SIDE:g} "
                           f"of the frame")
    return x0, y0, x1, y1


@dataclass
class CastRequest(GenerationRequest):
    """Scene prompt (`prompt`) + 2..4 characters → images with a distinct person per region.

    layout: "auto" (from aspect ratio), "columns", "rows", or "custom" (every character has a
    box; given boxes imply custom). identity_strength: IP-Adapter scale for every identity."""

    characters: list = field(default_factory=list)
    layout: str = "auto"
    identity_strength: float = DEFAULT_IDENTITY_STRENGTH
    identity_method: str | None = None  # faceid | faceid-plus-v2 | instantid; None: the profile's default

    kind = "cast"

    def validate(self) -> None:
        super().validate()
        lo, hi = CAST_CHARACTERS_RANGE
        if not isinstance(self.characters, (list, tuple)) or not lo <= len(self.characters) <= hi:
            n = len(self.characters) if isinstance(self.characters, (list, tuple)) else "no"
            raise _fail("characters", f"characters must hold {lo} to {hi} characters, got {n}")
        for i, c in enumerate(self.characters):
            if not isinstance(c, CastCharacter):
                raise _fail(f"characters[{i}]", f"characters[{i}] must be a character with a prompt")
            c.validate(i)
        if self.layout not in LAYOUTS:
            raise _fail("layout", f"layout must be one of {', '.join(LAYOUTS)}")
        with_box = [c.box is not None for c in self.characters]
        if any(with_box):
            if self.layout not in ("auto", "custom"):
                raise _fail("layout", f"layout {self.layout!r} conflicts with explicit boxes; use 'custom' or 'auto'")
            missing = with_box.index(False) if not all(with_box) else None
            if missing is not None:
                raise _fail(f"characters[{missing}].box",
                            f"characters[{missing}].box is required: when one character has a box, every "
                            f"character needs one")
            boxes = [validate_box(c.box, f"characters[{i}].box") for i, c in enumerate(self.characters)]
            for j in range(len(boxes)):
                for i in range(j):
                    ov = box_overlap(boxes[i], boxes[j])
                    if ov > MAX_BOX_OVERLAP:
                        raise _fail(f"characters[{j}].box",
                                    f"characters[{j}].box overlaps characters[{i}].box by {ov:.0%} of the smaller box; "
                                    f"at most {MAX_BOX_OVERLAP:.0%} is allowed so each person keeps their own region")
        elif self.layout == "custom":
            raise _fail("layout", "layout 'custom' needs a box for every character")
        lo_s, hi_s = IDENTITY_STRENGTH_RANGE
        if not _is_number(self.identity_strength) or not lo_s <= self.identity_strength <= hi_s:
            raise _fail("identityStrength", f"identityStrength must be a number between {lo_s:g} and {hi_s:g}")
        if self.init_image is not None:
            raise _fail("initImage", "cast does not take an init image")
        check_identity_method(self.identity_method)
        if self.identity_method in NEEDS_PHOTOS:
            self._require_photos(self.identity_method)

    def _require_photos(self, method: str) -> None:
        for i, c in enumerate(self.characters):
            if c.identity_embedding is not None:
                raise _fail(f"characters[{i}].identityEmbedding",
                            f"identityMethod {method} reads each face's reference photo: characters[{i}] needs photos, "
                            f"not only an identityEmbedding")

    def resolve(self, profile) -> "CastRequest":
        """Also fixes the identity method (the profile's default when none is named)."""
        import dataclasses

        from .adapters import resolve_method

        out = super().resolve(profile)
        method = None
        if getattr(profile, "identity_method", None) or self.identity_method:  # without methods: prompts only
            method = resolve_method(profile, self.identity_method)
            if method in NEEDS_PHOTOS:
                self._require_photos(method)
        return dataclasses.replace(out, identity_method=method)

    def region_boxes(self) -> tuple[str, list[Box]]:
        """(layout used, one normalised box per character). Needs width/height (resolve first)."""
        if self.characters and all(c.box is not None for c in self.characters):
            return "custom", [tuple(float(v) for v in c.box) for c in self.characters]  # type: ignore[misc]
        mode = self.layout
        if mode == "auto":
            mode = "rows" if self.height > self.width and len(self.characters) >= 3 else "columns"
        return mode, auto_layout(len(self.characters), self.width, self.height, mode)

    @property
    def uses_identity(self) -> bool:
        return any(c.has_identity for c in self.characters)


def cast_request_from_dict(data: dict[str, Any]) -> CastRequest:
    """A validated CastRequest from API-style JSON (camelCase), via `protocol.request_from_wire`.
    Photos must already be decoded to bytes or PIL images (the HTTP layer decodes base64 /
    multipart and resolves `avatarId`)."""
    from .protocol import request_from_wire

    req = request_from_wire(data, "cast")
    req.validate()
    return req


# ---------------------------------------------------------------------------------------
# identity matching and report

def match_identities(references: Sequence[np.ndarray | None],
                     face_embeddings: Sequence[np.ndarray]) -> list[tuple[int | None, float | None]]:
    """One-to-one assignment of output faces to reference identities maximising the total
    cosine similarity (scipy's linear_sum_assignment). Returns (face index, similarity) per
    reference; (None, None) for a reference without embedding or left without a face."""
    from scipy.optimize import linear_sum_assignment

    out: list[tuple[int | None, float | None]] = [(None, None)] * len(references)
    rows = [i for i, r in enumerate(references) if r is not None]
    if not rows or len(face_embeddings) == 0:
        return out
    refs = np.stack([np.asarray(references[i], np.float64).reshape(-1) for i in rows])
    faces = np.stack([np.asarray(f, np.float64).reshape(-1) for f in face_embeddings])
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    faces /= np.maximum(np.linalg.norm(faces, axis=1, keepdims=True), 1e-12)
    sim = refs @ faces.T
    for r, c in zip(*linear_sum_assignment(sim, maximize=True)):
        out[rows[r]] = (int(c), round(float(sim[r, c]), 4))
    return out


def _region_of(point: tuple[float, float], pixel_boxes: Sequence[tuple[int, int, int, int]]) -> int | None:
    x, y = point
    hits = [j for j, (x0, y0, x1, y1) in enumerate(pixel_boxes) if x0 <= x < x1 and y0 <= y < y1]
    return hits[0] if hits else None


def identity_report(scorer, images: Sequence[Any], references: Sequence[np.ndarray | None],
                    pixel_boxes: Sequence[tuple[int, int, int, int]]) -> tuple[list[list[dict]], list[int]]:
    """Per character, per image: the output face matched to its reference (one-to-one, least
    total scorer distance), the scorer's similarity/distance/verdict, and which region the face
    lies in. `references` are scorer descriptors (identity.scoring_reference). Also the number
    of faces the scorer detected per image."""
    from .identity import match_faces

    per_char: list[list[dict]] = [[] for _ in references]
    counts = []
    none = {"similarity": None, "distance": None, "sameIdentity": None, "faceBox": None, "foundInRegion": None}
    for image in images:
        faces = scorer.describe(image)
        counts.append(len(faces))
        for i, (fi, m) in enumerate(match_faces(scorer, references, [f.descriptor for f in faces])):
            if fi is None:
                per_char[i].append(dict(none))
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
                ref = analyze_references(self.engine, images, model.profile.face_min_size,
                                         param=f"characters[{i}].photos",
                                         crops=request.identity_method in NEEDS_PHOTOS)
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
            from .adapters import identity_adapter

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
        cfg = first.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        # Unused character slots repeat the scene prompt (cached) under a zero weight.
        texts = [t for plan in plans for t in [plan.scene.prompt] + [p.prompt for p in plan.region_prompts]
                 + [plan.scene.prompt] * (MAX_CHARACTERS - len(plan.region_prompts))]
        pos, pos_pooled = model.prompts.encode(texts)
        neg, neg_pooled = model.prompts.encode([plan.scene.negative_prompt for plan in plans])
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
            from .adapters import identity_adapter

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
        from .adapters import keypoint_images, kps_in_box

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
        from .identity import face_scorer, scoring_reference

        request: CastRequest = result.request  # type: ignore[assignment]
        scorer = face_scorer(self.engine)
        references = [scoring_reference(scorer, self.engine.face_analyzer, ref, emb)
                      for ref, emb in zip(plan.references, plan.embeddings)]
        if any(e is not None for e in references):
            per_char, counts = identity_report(scorer, result.images, references, plan.pixel_boxes)
        else:
            none = {"similarity": None, "distance": None, "sameIdentity": None, "faceBox": None, "foundInRegion": None}
            per_char, counts = [[dict(none) for _ in result.images] for _ in references], []
        characters = []
        for i, c in enumerate(request.characters):
            sims = [m["similarity"] for m in per_char[i] if m["similarity"] is not None]
            ref = plan.references[i]
            characters.append({
                "index": i,
                "prompt": c.prompt,
                "regionPrompt": plan.region_prompts[i].prompt,
                "droppedWords": plan.region_prompts[i].dropped_words,  # cut to fit the 77-token window
                "box": [round(v, 4) for v in plan.boxes[i]],
                "pixelBox": list(plan.pixel_boxes[i]),
                "hasIdentity": plan.embeddings[i] is not None,
                "identitySource": plan.sources[i],
                "referencePhotos": len(c.photos),
                "referenceConsistency": round(float(ref.consistency), 4) if ref is not None else None,
                "notes": list(ref.notes) if ref is not None else [],
                # mean over this request's images where a face was matched to this identity
                "similarity": round(float(np.mean(sims)), 4) if sims else None,
                "sameIdentity": all(m["sameIdentity"] for m in per_char[i] if m["sameIdentity"] is not None)
                if sims else None,
                "images": per_char[i],
            })
        result.extra["characters"] = characters
        result.extra["scorer"] = scorer.info()
        result.extra["layout"] = plan.layout
        result.extra["identityStrength"] = request.identity_strength
        result.extra["identityMethod"] = request.identity_method if plan.has_identity else None
        if counts:
            result.extra["facesDetected"] = counts


TASKS = [CastTask]


# ---------------------------------------------------------------------------------------
# CLI

def _indexed(values: Sequence[str], flag: str, n: int) -> list[tuple[int, str]]:
    """Parse repeated `N=VALUE` flags (N is a 1-based character number)."""
    out = []
    for raw in values:
        num, sep, value = raw.partition("=")
        if not sep or not num.strip().isdigit() or not value:
            raise RequestValidationError(f"{flag} {raw!r}: expected N=VALUE with N a character number 1..{n}",
                                         param=flag)
        idx = int(num)
        if not 1 <= idx <= n:
            raise RequestValidationError(f"{flag} {raw!r}: there are {n} --character flags, so N must be 1..{n}",
                                         param=flag)
        out.append((idx - 1, value))
    return out


def request_from_args(args) -> CastRequest:
    from .cli import generation_kwargs

    n = len(args.character)
    characters = [CastCharacter(prompt=p) for p in args.character]
    for i, path in _indexed(args.photo, "--photo", n):
        with open(path, "rb") as fh:
            characters[i].photos.append(fh.read())
    for i, value in _indexed(args.box, "--box", n):
        try:
            characters[i].box = [float(v) for v in value.split(",")]
        except ValueError:
            raise RequestValidationError(f"--box {value!r}: expected four numbers x0,y0,x1,y1", param="--box") from None
    return CastRequest(prompt=args.scene, characters=characters, layout=args.layout,
                       identity_strength=args.identity_strength, identity_method=args.identity_method,
                       **generation_kwargs(args))


def cmd_cast(args) -> None:
    from .cli import make_engine, write_outputs

    request = request_from_args(args)
    write_outputs(make_engine(args).generate(request), args.output, "cast", mark=not args.no_mark)


def add_cli(subparsers) -> None:
    from .cli import add_engine_args, add_generation_args

    p = subparsers.add_parser(
        "cast", help="scene + 2..4 characters → one image with a distinct person per region",
        description="One denoising pass with a region per character: each character's prompt and face "
                    "apply only inside its region. Writes PNGs and a JSON sidecar with a per-character report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example: avatar-engine cast --scene "two astronauts on mars" --character "a woman in a red suit" '
               '--character "a man in a blue suit" --photo 1=a.jpg --photo 2=b.jpg -o out')
    p.add_argument("--scene", required=True, help="scene prompt (background and shared setting)")
    p.add_argument("--character", action="append", required=True, metavar="PROMPT",
                   help="a character's prompt; repeat 2-4 times (numbered 1, 2, ... in order)")
    p.add_argument("--photo", action="append", default=[], metavar="N=PATH",
                   help="reference photo for character N (repeat for up to 5 photos per character)")
    p.add_argument("--box", action="append", default=[], metavar="N=X0,Y0,X1,Y1",
                   help="region of character N as fractions of the frame; give one for every character or none")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="auto: columns for landscape/square, rows for portrait with 3-4 characters")
    p.add_argument("--identity-strength", type=float, default=DEFAULT_IDENTITY_STRENGTH,
                   help=f"IP-Adapter FaceID scale {IDENTITY_STRENGTH_RANGE[0]:g}..{IDENTITY_STRENGTH_RANGE[1]:g}")
    p.add_argument("--identity-method", choices=("faceid", "faceid-plus-v2", "instantid"), default=None,
                   help="identity method for every face (default: the model's); the model must offer it")
    add_generation_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_cast)
