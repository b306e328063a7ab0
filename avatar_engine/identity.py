"""Percify-yourself: identity-preserving avatars from 1..5 photos of one person.

Per request (`PercifyTask.prepare`): each reference photo goes through the engine's face
analyzer (no face → error naming the photo; several → the largest, noted; too small → error);
the photos' embeddings combine into one identity (normed mean). Each image of the request then
carries that 512-d identity as its conditioning, so percify requests batch with each other
(one row of `ip_adapter_image_embeds` per image) and a request's images are the same whether
it ran alone or packed with others.

Identity strength is the IP-Adapter scale of each image (and the FaceID LoRA's weight, capped
at 1), passed as a per-image tensor, so requests of different strengths share a call (scaling
the embedding instead would not work: the FaceID projection ends in a LayerNorm, which undoes
any scaling). Strength 0 reproduces the plain pipeline exactly.

Every result carries `extra["identity"]`: faces found per photo, which was used, and per output
image the cosine similarity between the reference identity and the largest face the same
analyzer finds in the output (null when it finds none).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .adapters import FACEID_EMBED_DIM, identity_adapter
from .attention import conditioned
from .engine import LoadedModel, Task, WorkItem
from .errors import RequestValidationError
from .requests import IDENTITY_STRENGTH_RANGE, GenerationRequest, GenerationResult, check_photos

PHOTOS_PARAM = "photos"
REFERENCE_CACHE_SIZE = 32


def _photo_param(i: int, param: str = PHOTOS_PARAM) -> str:
    return f"{param}[{i}]"


def check_photo_types(photos: Sequence, param: str = PHOTOS_PARAM) -> None:
    """Each photo must be a PIL image or encoded bytes; the error names `param[i]`.
    Shared by percify and cast."""
    from PIL import Image

    for i, photo in enumerate(photos):
        if not isinstance(photo, (Image.Image, bytes, bytearray, memoryview)):
            raise RequestValidationError(f"{_photo_param(i, param)} must be an image (PIL image or JPEG/PNG/WebP "
                                         f"bytes)", param=_photo_param(i, param))


def load_photo(photo: Any, param: str):
    """An upright RGB PIL image from a PIL image or encoded bytes (decoded safely by
    `images.load_image`, errors naming `param`). Shared by percify and cast."""
    from PIL import Image, ImageOps

    if isinstance(photo, Image.Image):
        return ImageOps.exif_transpose(photo).convert("RGB")
    from .images import load_image

    return load_image(bytes(photo), param=param)


def normed_embedding(value: Any, param: str = "identityEmbedding") -> np.ndarray:
    """A 512-d L2-normed float32 identity, or an error naming `param`. Shared by percify and cast."""
    try:
        v = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise RequestValidationError(f"{param} must be a list of {FACEID_EMBED_DIM} numbers", param=param) from None
    if v.shape != (FACEID_EMBED_DIM,):
        raise RequestValidationError(f"{param} must have {FACEID_EMBED_DIM} numbers, got {v.size}", param=param)
    norm = float(np.linalg.norm(v))
    if not np.all(np.isfinite(v)) or not math.isfinite(norm) or norm == 0.0:
        raise RequestValidationError(f"{param} must be finite and not all zeros", param=param)
    return (v / norm).astype(np.float32)


@dataclass
class PercifyRequest(GenerationRequest):
    """Prompt + 1..5 photos of one person → avatars with that person's face.

    photos: PIL images or encoded image bytes (JPEG/PNG/WebP; decoded safely by
    `images.load_image`). identity_strength: IP-Adapter scale, 0 = plain generation.
    identity_embedding: a precomputed 512-d identity (e.g. from an earlier request or the cast
    task) used instead of photos. score_outputs: False skips the per-image similarity (the
    report then says `"scored": false`), e.g. for throughput benchmarks."""

    photos: list = field(default_factory=list)
    identity_strength: float = 0.8
    identity_embedding: Any = None
    score_outputs: bool = True  # face-analyse every output for the similarity report (CPU time per image)

    kind = "percify"

    def validate(self) -> None:
        super().validate()
        lo, hi = IDENTITY_STRENGTH_RANGE
        ok = isinstance(self.identity_strength, (int, float)) and not isinstance(self.identity_strength, bool) \
            and math.isfinite(self.identity_strength) and lo <= self.identity_strength <= hi
        if not ok:
            raise RequestValidationError(f"identityStrength must be a number between {lo:g} and {hi:g}",
                                         param="identityStrength")
        if self.identity_embedding is not None:
            if self.photos:
                raise RequestValidationError("pass photos or identityEmbedding, not both", param="identityEmbedding")
            normed_embedding(self.identity_embedding)
            return
        check_photos(self.photos, PHOTOS_PARAM)
        check_photo_types(self.photos, PHOTOS_PARAM)

    def resolve(self, profile) -> "PercifyRequest":
        """Also decodes photo bytes (errors name `photos[i]`) and normalises the embedding."""
        out = super().resolve(profile)
        photos = [load_photo(p, _photo_param(i)) for i, p in enumerate(self.photos)]
        emb = None if self.identity_embedding is None else normed_embedding(self.identity_embedding)
        return dataclasses.replace(out, photos=photos, identity_strength=float(self.identity_strength),
                                   identity_embedding=emb)


@dataclass
class IdentityConditioning:
    """What one percify request conditions on (shared by all its images)."""

    embedding: np.ndarray  # 512-d, L2-normed
    source: str  # "photos" | "embedding"
    faces: list[dict] = field(default_factory=list)  # per reference photo
    notes: list[str] = field(default_factory=list)
    consistency: float | None = None
    crops: list = field(default_factory=list)  # aligned 224 px face crops (faceid-plusv2 only)


def _face_json(face) -> dict:
    return {"bbox": [round(float(v), 1) for v in face.bbox], "detScore": round(float(face.det_score), 4),
            "size": round(min(face.width, face.height), 1)}


def identity_similarity(analyzer, reference: np.ndarray, image) -> tuple[float | None, int]:
    """(cosine similarity of `reference` to the largest face in `image`, faces found);
    similarity is None when no face is found."""
    from .faces import cosine_similarity, largest_face

    faces = analyzer.embed(image)
    face = largest_face(faces)
    if face is None or face.embedding is None:
        return None, len(faces)
    return round(cosine_similarity(reference, face.embedding), 4), len(faces)


_REFERENCE_CACHES: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def analyze_references(engine, photos: Sequence, min_face_size: int, *, param: str = PHOTOS_PARAM,
                       crops: bool = False) -> IdentityConditioning:
    """Reference photos → identity, applying the face policy (errors name `param[i]`). Cached
    per engine by pixel content (a user often sends the same photos again, to percify or cast;
    detection dominates a tiny model's cost). Shared by percify and cast; callers hold the
    engine lock. Callers must not mutate the result (it is shared between requests)."""
    from .faces import analyze_reference_photos

    analyzer = engine.face_analyzer
    cache = _REFERENCE_CACHES.setdefault(engine, OrderedDict())
    key = (id(analyzer), min_face_size, crops, param, tuple(_digest(p) for p in photos))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    ref = analyze_reference_photos(analyzer, list(photos), param=param, min_face_size=min_face_size)
    faces = []
    for i, (n, face) in enumerate(zip(ref.faces_per_photo, ref.used_faces)):
        faces.append({"photo": _photo_param(i, param), "found": int(n), "used": _face_json(face),
                      "usedRule": "largest" if n > 1 else "only"})
    cond = IdentityConditioning(embedding=np.asarray(ref.embedding, np.float32), source="photos", faces=faces,
                                notes=list(ref.notes), consistency=round(float(ref.consistency), 4))
    if crops:
        from .faces import align_face

        cond.crops = [align_face(p, f.kps, 224) for p, f in zip(photos, ref.used_faces)]
    cache[key] = cond
    while len(cache) > REFERENCE_CACHE_SIZE:
        cache.popitem(last=False)
    return cond


class PercifyTask(Task):
    """Percify-yourself on any profile with an `ip_adapter`."""

    name = "percify"

    # ---- per request ----------------------------------------------------------------------
    def prepare(self, model: LoadedModel, request: PercifyRequest) -> IdentityConditioning:
        adapter = identity_adapter(model)  # loads once; fails early on a profile without one
        if request.identity_embedding is not None:
            if adapter.variant == "faceid-plusv2":
                raise RequestValidationError("this model's FaceID Plus adapter needs reference photos, not only an "
                                             "identityEmbedding", param="photos")
            return IdentityConditioning(embedding=np.asarray(request.identity_embedding, np.float32),
                                        source="embedding")
        return self.analyze(request.photos, model.profile.face_min_size, crops=adapter.variant == "faceid-plusv2")

    def analyze(self, photos: Sequence, min_face_size: int, crops: bool = False) -> IdentityConditioning:
        return analyze_references(self.engine, photos, min_face_size, crops=crops)

    # group_key: the base key. Strength is a per-image tensor (adapter.weights), so requests
    # of any strength share calls.

    # ---- per pipeline call ------------------------------------------------------------------
    @staticmethod
    def _uses_cfg(model: LoadedModel, guidance_scale: float) -> bool:
        """The pipeline's own rule for classifier-free guidance (it decides the batch layout)."""
        return guidance_scale > 1 and getattr(model.pipe.unet.config, "time_cond_proj_dim", None) is None

    def run(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem],
            callback: Callable | None) -> list:
        first = requests[items[0].request_index]
        adapter = identity_adapter(model)
        cfg = self._uses_cfg(model, first.guidance_scale)
        clip = None
        if adapter.variant == "faceid-plusv2":
            clip = adapter.clip_embeds([it.conditioning.crops for it in items], cfg)
        faces = adapter.tokens([it.conditioning.embedding for it in items], cfg, clip_embeds=clip)
        weights = adapter.weights([requests[it.request_index].identity_strength for it in items], cfg)
        with conditioned(model.pipe.unet, mode="identity", faces=faces, **weights):
            return super().run(model, requests, items, callback)

    # ---- per result -------------------------------------------------------------------------
    def _backend_notes(self, model: LoadedModel) -> list[str]:
        src = model.profile.ip_adapter
        if src is not None and not src.tiny and self.engine.config.face_backend == "embedded":
            return ["the embedded face backend's embeddings are not ArcFace embeddings; real IP-Adapter FaceID "
                    "weights expect the insightface backend (--face-backend insightface) for a faithful likeness"]
        return []

    def finalize(self, model: LoadedModel, result: GenerationResult, prepared: IdentityConditioning) -> None:
        sims, found = [], []
        scored = bool(getattr(result.request, "score_outputs", True))
        analyzer = self.engine.face_analyzer if scored else None
        for image in result.images:
            s, n = identity_similarity(analyzer, prepared.embedding, image) if scored else (None, None)
            sims.append(s)
            found.append(n)
        result.extra["identity"] = {
            "source": prepared.source,
            "strength": result.request.identity_strength,
            "backend": self.engine.config.face_backend,
            "adapter": identity_adapter(model).label,
            "referencePhotos": len(prepared.faces),
            "faces": copy.deepcopy(prepared.faces),  # prepared may be a cached object shared by requests
            "notes": prepared.notes + self._backend_notes(model),
            "consistency": prepared.consistency,
            "scored": scored,
            "similarity": sims,
            "outputFaces": found,
        }


def _digest(image) -> str:
    h = hashlib.sha1(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


TASKS = [PercifyTask]


# ---- CLI ------------------------------------------------------------------------------------
def cmd_percify(args) -> None:
    from .cli import generation_kwargs, make_engine, write_outputs

    photos = []
    for path in args.photos:
        with open(path, "rb") as fh:
            photos.append(fh.read())
    engine = make_engine(args)
    req = PercifyRequest(prompt=args.prompt, photos=photos, identity_strength=args.identity_strength,
                         **generation_kwargs(args))
    result = engine.generate(req)
    result.extra["identity"]["photoFiles"] = list(args.photos)
    write_outputs(result, args.output, "percify")


def add_cli(subparsers) -> None:
    from .cli import add_engine_args, add_generation_args

    p = subparsers.add_parser("percify", help="1..5 photos of one person + prompt → avatars with that face")
    p.add_argument("photos", nargs="+", help="reference photos (JPEG/PNG/WebP) of one person")
    p.add_argument("--prompt", default="a portrait of a person", help="what to make of the person")
    p.add_argument("--identity-strength", type=float, default=0.8,
                   help=f"{IDENTITY_STRENGTH_RANGE[0]:g}..{IDENTITY_STRENGTH_RANGE[1]:g}; 0 ignores the face")
    add_generation_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_percify)
