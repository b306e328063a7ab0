"""Percify-yourself: identity-preserving avatars from 1..5 photos of one person.

Per request (`PercifyTask.prepare`): each reference photo goes through the engine's face
analyzer (no face → error naming the photo; several → the largest, noted; too small → error);
the photos' embeddings combine into one identity (normed mean). Each image of the request then
carries that 512-d identity as its conditioning, so percify requests batch with each other
(one row of `ip_adapter_image_embeds` per image) and a request's images are the same whether
it ran alone or packed with others.

Identity method (`identity_method`: faceid, faceid-plus-v2, instantid; adapters.py) is chosen per
request among those the model offers (its default when none is named); requests batch per method.
Plus v2 also encodes the reference face crops with CLIP; InstantID also draws the reference face's
keypoints into the output frame for its IdentityNet ControlNet.

Identity strength is the IP-Adapter scale of each image (and the FaceID LoRA's / InstantID
ControlNet's weight, capped at 1), passed as a per-image tensor, so requests of different strengths share a call (scaling
the embedding instead would not work: the FaceID projection ends in a LayerNorm, which undoes
any scaling). Strength 0 reproduces the plain pipeline exactly.

Conditioning and scoring are separate (faces/scoring.py): the face analyzer gives the 512-d
embedding IP-Adapter FaceID conditions on; a face *scorer* (dlib's ResNet descriptor by default)
produces every identity number reported. Reference photos that are not one person by the
scorer's verdict are refused (`IdentityMismatchError` naming the odd photo), or dropped with a
note when the request says `mismatched_photos="drop"`.

Every result carries `extra["identity"]`: faces found per photo, which was used, the scorer
(`scorer`: name, metric, threshold, whether it is the unreliable fallback), the reference photos'
consistency, and per output image, against the reference photos' scorer centroid: `similarity`
(cosine of the scorer's descriptors), `distance` (the scorer's metric) and `sameIdentity` (its
verdict) for the largest face the scorer finds in the output (null when it finds none).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .adapters import FACEID_EMBED_DIM, identity_adapter, keypoint_images, kps_in_frame, resolve_method
from .attention import conditioned
from .engine import LoadedModel, Task, WorkItem
from .errors import RequestValidationError
from .config import IDENTITY_METHODS
from .faces.scoring import MISMATCH_POLICIES
from .requests import IDENTITY_STRENGTH_RANGE, GenerationRequest, GenerationResult, check_photos

PHOTOS_PARAM = "photos"
REFERENCE_CACHE_SIZE = 32
NEEDS_PHOTOS = ("faceid-plus-v2",)  # methods that read the reference face crop, not only the embedding


def check_identity_method(value: Any, param: str = "identityMethod") -> None:
    """A known identity method name or None (the profile decides which it offers, at resolve).
    Shared by percify and cast."""
    from .config import IDENTITY_METHODS

    if value is not None and value not in IDENTITY_METHODS:
        raise RequestValidationError(f"{param} must be one of {', '.join(IDENTITY_METHODS)}", param=param)


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


def refuse_other_people(photos: Sequence, param: str = PHOTOS_PARAM) -> None:
    """Request-time one-person check (no engine needed, so a service runs it at submit): with
    2+ photos, photos that the process-wide default scorer judges to be another person raise
    `IdentityMismatchError` naming `param[i]`. Photos in which it finds no face are left to the
    engine's face policy; with the hand-crafted fallback scorer nothing is checked. Shared by
    percify and cast."""
    if len(photos) < 2:
        return
    from .faces.scoring import default_scorer

    scorer = default_scorer()
    if scorer.recognition_model:  # the hand-crafted fallback's verdict is never enforced
        images = [load_photo(p, _photo_param(i, param)) for i, p in enumerate(photos)]
        check_reference_identity(scorer, images, param, "refuse")


@dataclass
class PercifyRequest(GenerationRequest):
    """Prompt + 1..5 photos of one person → avatars with that person's face.

    photos: PIL images or encoded image bytes (JPEG/PNG/WebP; decoded safely by
    `images.load_image`). identity_strength: IP-Adapter scale, 0 = plain generation.
    identity_embedding: a precomputed 512-d identity (e.g. from an earlier request or the cast
    task) used instead of photos. score_outputs: False skips the per-image similarity (the
    report then says `"scored": false`), e.g. for throughput benchmarks.
    mismatched_photos: "refuse" (default) — photos that are not one person by the face scorer's
    verdict are an `IdentityMismatchError` naming the odd photo, raised by `validate()` (so a
    service refuses them at submit time); "drop" — the odd photos are left out with a note (at
    most half of them)."""

    photos: list = field(default_factory=list)
    identity_strength: float = 0.8
    identity_embedding: Any = None
    score_outputs: bool = True  # face-analyse every output for the similarity report (CPU time per image)
    mismatched_photos: str = "refuse"
    identity_method: str | None = None  # faceid | faceid-plus-v2 | instantid; None: the profile's default

    kind = "percify"

    def validate(self) -> None:
        super().validate()
        lo, hi = IDENTITY_STRENGTH_RANGE
        ok = isinstance(self.identity_strength, (int, float)) and not isinstance(self.identity_strength, bool) \
            and math.isfinite(self.identity_strength) and lo <= self.identity_strength <= hi
        if not ok:
            raise RequestValidationError(f"identityStrength must be a number between {lo:g} and {hi:g}",
                                         param="identityStrength")
        if self.mismatched_photos not in MISMATCH_POLICIES:
            raise RequestValidationError(f"mismatchedPhotos must be one of {', '.join(MISMATCH_POLICIES)}",
                                         param="mismatchedPhotos")
        check_identity_method(self.identity_method)
        if self.identity_embedding is not None:
            if self.photos:
                raise RequestValidationError("pass photos or identityEmbedding, not both", param="identityEmbedding")
            if self.identity_method in NEEDS_PHOTOS:
                raise RequestValidationError(f"identityMethod {self.identity_method} reads the face crop of a reference "
                                             f"photo: send photos, not only an identityEmbedding", param="identityEmbedding")
            normed_embedding(self.identity_embedding)
            return
        check_photos(self.photos, PHOTOS_PARAM)
        check_photo_types(self.photos, PHOTOS_PARAM)
        if self.mismatched_photos == "refuse":
            refuse_other_people(self.photos, PHOTOS_PARAM)

    def resolve(self, profile) -> "PercifyRequest":
        """Also decodes photo bytes (errors name `photos[i]`) and normalises the embedding."""
        out = super().resolve(profile)
        photos = [load_photo(p, _photo_param(i)) for i, p in enumerate(self.photos)]
        emb = None if self.identity_embedding is None else normed_embedding(self.identity_embedding)
        method = resolve_method(profile, self.identity_method)
        if emb is not None and method in NEEDS_PHOTOS:
            raise RequestValidationError(f"model {profile.name!r} uses identityMethod {method}, which reads the face "
                                         f"crop of a reference photo: send photos, not only an identityEmbedding",
                                         param="identityEmbedding")
        return dataclasses.replace(out, photos=photos, identity_strength=float(self.identity_strength),
                                   identity_embedding=emb, identity_method=method)


@dataclass
class IdentityConditioning:
    """What one percify request (or one cast character) conditions on and is scored against."""

    embedding: np.ndarray  # 512-d, L2-normed: the conditioning identity
    source: str  # "photos" | "embedding"
    faces: list[dict] = field(default_factory=list)  # per reference photo
    notes: list[str] = field(default_factory=list)
    consistency: float | None = None  # lowest leave-one-out cosine similarity of the scorer's descriptors
    crops: list = field(default_factory=list)  # aligned 224 px face crops (faceid-plus-v2 only)
    kps: np.ndarray | None = None  # 5 keypoints of the first kept photo's face, in its pixels (instantid)
    photo_size: tuple[int, int] | None = None  # (width, height) of that photo
    score_reference: np.ndarray | None = None  # scorer centroid of the kept photos (None: nothing to score against)
    check: dict | None = None  # the reference-photo check, as reported


def _face_json(face) -> dict:
    return {"bbox": [round(float(v), 1) for v in face.bbox], "detScore": round(float(face.det_score), 4),
            "size": round(min(face.width, face.height), 1)}


# ---- scoring ---------------------------------------------------------------------------------

_SCORERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_DESCRIPTORS: OrderedDict = OrderedDict()
_DESCRIPTORS_LOCK = threading.Lock()
DESCRIPTOR_CACHE_SIZE = 64


def face_scorer(engine):
    """The engine's face scorer, from `EngineConfig.face_scorer` ("auto": the process-wide
    default, dlib when installed — the same object request validation uses)."""
    scorer = _SCORERS.get(engine)
    if scorer is None:
        from .faces.scoring import default_scorer, scorer_from_config

        name = getattr(engine.config, "face_scorer", "auto") or "auto"
        if name == "auto" or (name == "dlib" and default_scorer().name == "dlib-resnet"):
            scorer = default_scorer()  # shared with request validation: reference photos are described once
        else:
            analyzer = engine.face_analyzer if name in ("arcface", "handcrafted") else None
            scorer = scorer_from_config(name, analyzer=analyzer)
        _SCORERS[engine] = scorer
    return scorer


def reference_descriptor(scorer, image):
    """The scorer's descriptor of the largest face in a reference photo (None: no face),
    cached by pixel content (validation at submit and the engine's prepare see the same photos)."""
    key = (id(scorer), _digest(image))
    with _DESCRIPTORS_LOCK:
        if key in _DESCRIPTORS:
            _DESCRIPTORS.move_to_end(key)
            return _DESCRIPTORS[key]
    faces = scorer.describe(image)
    desc = faces[0].descriptor if faces else None
    with _DESCRIPTORS_LOCK:
        _DESCRIPTORS[key] = desc
        while len(_DESCRIPTORS) > DESCRIPTOR_CACHE_SIZE:
            _DESCRIPTORS.popitem(last=False)
    return desc


def check_reference_identity(scorer, images: Sequence, param: str = PHOTOS_PARAM, policy: str = "refuse"):
    """Reference photos → `faces.scoring.ReferenceCheck` (refuses or drops photos of another
    person, see `check_same_person`)."""
    from .faces.scoring import check_same_person

    return check_same_person(scorer, [reference_descriptor(scorer, im) for im in images], param=param, policy=policy)


def _check_json(check, param: str) -> dict:
    return {"consistent": check.consistent, "enforced": check.enforced,
            "dropped": [_photo_param(i, param) for i in check.dropped],
            "unscored": [_photo_param(i, param) for i in check.unscored],
            "photos": [None if m is None else {"photo": _photo_param(i, param), **m.to_json()}
                       for i, m in enumerate(check.matches)]}


def scoring_reference(scorer, analyzer, cond: "IdentityConditioning | None", embedding) -> np.ndarray | None:
    """What outputs are scored against: the photos' scorer centroid; for a bare identity
    embedding only when the scorer works in the conditioning space (same analyzer), else None."""
    if cond is not None and cond.score_reference is not None:
        return cond.score_reference
    if embedding is not None and getattr(scorer, "analyzer", None) is analyzer:
        return np.asarray(embedding, np.float32)
    return None


def identity_similarity(scorer, reference: np.ndarray | None, image) -> tuple[Any, int]:
    """(`Match` of the largest face the scorer finds in `image` against `reference`, faces
    found); the match is None when no face is found or there is no reference."""
    faces = scorer.describe(image)
    if not faces or reference is None:
        return None, len(faces)
    return scorer.compare(reference, faces[0].descriptor), len(faces)


def match_faces(scorer, references: Sequence[np.ndarray | None], descriptors: Sequence[np.ndarray]) -> list:
    """One-to-one assignment of faces to references minimising the total scorer distance
    (Hungarian algorithm). Returns (face index, Match) per reference; (None, None) for a
    reference that is None or left without a face."""
    from scipy.optimize import linear_sum_assignment

    out: list = [(None, None)] * len(references)
    rows = [i for i, r in enumerate(references) if r is not None]
    if not rows or len(descriptors) == 0:
        return out
    cost = np.array([[scorer.distance(references[i], d) for d in descriptors] for i in rows])
    for r, c in zip(*linear_sum_assignment(cost)):
        out[rows[r]] = (int(c), scorer.compare(references[rows[r]], descriptors[c]))
    return out


_REFERENCE_CACHES: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


def analyze_references(engine, photos: Sequence, min_face_size: int, *, param: str = PHOTOS_PARAM,
                       crops: bool = False, mismatched: str = "refuse") -> IdentityConditioning:
    """Reference photos → identity, applying the face policy (errors name `param[i]`) and the
    one-person check by the engine's scorer (refuse or drop, see `check_same_person`). Cached
    per engine by pixel content (a user often sends the same photos again, to percify or cast;
    detection dominates a tiny model's cost). Shared by percify and cast; callers hold the
    engine lock. Callers must not mutate the result (it is shared between requests)."""
    from .faces import analyze_reference_photos, combine_embeddings

    analyzer = engine.face_analyzer
    scorer = face_scorer(engine)
    cache = _REFERENCE_CACHES.setdefault(engine, OrderedDict())
    key = (id(analyzer), id(scorer), min_face_size, crops, param, mismatched, tuple(_digest(p) for p in photos))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    ref = analyze_reference_photos(analyzer, list(photos), param=param, min_face_size=min_face_size)
    check = check_reference_identity(scorer, photos, param, mismatched)
    faces = []
    for i, (n, face) in enumerate(zip(ref.faces_per_photo, ref.used_faces)):
        faces.append({"photo": _photo_param(i, param), "found": int(n), "used": _face_json(face),
                      "usedRule": "largest" if n > 1 else "only", "dropped": i in check.dropped})
    kept = [i for i in range(len(photos)) if i not in check.dropped]
    embedding = ref.embedding if not check.dropped else combine_embeddings([ref.used_faces[i].embedding for i in kept])
    cond = IdentityConditioning(embedding=np.asarray(embedding, np.float32), source="photos", faces=faces,
                                notes=list(ref.notes) + check.notes, consistency=round(float(check.consistency), 4),
                                score_reference=check.reference, check=_check_json(check, param))
    if kept:
        cond.kps = np.asarray(ref.used_faces[kept[0]].kps, np.float64)
        cond.photo_size = tuple(photos[kept[0]].size)
    if crops:
        from .faces import align_face

        cond.crops = [align_face(photos[i], ref.used_faces[i].kps, 224) for i in kept]
    cache[key] = cond
    while len(cache) > REFERENCE_CACHE_SIZE:
        cache.popitem(last=False)
    return cond


class PercifyTask(Task):
    """Percify-yourself on any profile with an `ip_adapter`."""

    name = "percify"

    # ---- per request ----------------------------------------------------------------------
    def prepare(self, model: LoadedModel, request: PercifyRequest) -> IdentityConditioning:
        adapter = identity_adapter(model, request.identity_method)  # loaded at load; fails early without one
        if request.identity_embedding is not None:
            return IdentityConditioning(embedding=np.asarray(request.identity_embedding, np.float32),
                                        source="embedding")
        return self.analyze(request.photos, model.profile.face_min_size, crops=adapter.needs_crops,
                            mismatched=request.mismatched_photos)

    def analyze(self, photos: Sequence, min_face_size: int, crops: bool = False,
                mismatched: str = "refuse") -> IdentityConditioning:
        return analyze_references(self.engine, photos, min_face_size, crops=crops, mismatched=mismatched)

    def group_key(self, request: GenerationRequest) -> tuple:
        """The base key plus the identity method (one method per call: it picks the weights).
        Strength is a per-image tensor (adapter.weights), so requests of any strength share calls."""
        return super().group_key(request) + (request.identity_method,)

    # ---- per pipeline call ------------------------------------------------------------------
    @staticmethod
    def _uses_cfg(model: LoadedModel, guidance_scale: float) -> bool:
        """The pipeline's own rule for classifier-free guidance (it decides the batch layout)."""
        return guidance_scale > 1 and getattr(model.pipe.unet.config, "time_cond_proj_dim", None) is None

    def run(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem],
            callback: Callable | None) -> list:
        first = requests[items[0].request_index]
        adapter = identity_adapter(model, first.identity_method)
        cfg = self._uses_cfg(model, first.guidance_scale)
        clip = None
        if adapter.needs_crops:
            clip = adapter.clip_embeds([[it.conditioning.crops] for it in items], cfg)
        faces = adapter.tokens([it.conditioning.embedding for it in items], cfg, clip_embeds=clip)
        strengths = [requests[it.request_index].identity_strength for it in items]
        weights = adapter.weights(strengths, cfg)
        control = contextlib.nullcontext()
        if adapter.identitynet is not None:
            kps = [[kps_in_frame(it.conditioning.kps, it.conditioning.photo_size, first.width, first.height)]
                   for it in items]
            images = keypoint_images(kps, first.width, first.height, model.device, model.dtype, cfg)
            control = adapter.identitynet.applied(model.pipe.unet, faces, images,
                                                  adapter.control_weights(strengths, cfg))
        with conditioned(model.pipe.unet, mode="identity", method=adapter.method, faces=faces, **weights), control:
            return super().run(model, requests, items, callback)

    # ---- per result -------------------------------------------------------------------------
    def _backend_notes(self, model: LoadedModel, method: str | None = None) -> list[str]:
        src = model.profile.identity_methods.get(method) if method else model.profile.ip_adapter
        if src is not None and not src.tiny and self.engine.config.face_backend == "embedded":
            return ["the embedded face backend's embeddings are not ArcFace embeddings; real IP-Adapter FaceID "
                    "weights expect the insightface backend (--face-backend insightface) for a faithful likeness"]
        return []

    def finalize(self, model: LoadedModel, result: GenerationResult, prepared: IdentityConditioning) -> None:
        sims, dists, same, found = [], [], [], []
        scored = bool(getattr(result.request, "score_outputs", True))
        scorer = face_scorer(self.engine)
        notes = list(prepared.notes)
        reference = scoring_reference(scorer, self.engine.face_analyzer, prepared,
                                      prepared.embedding if prepared.source == "embedding" else None)
        if scored and reference is None:
            notes.append(f"no reference photo to score against: an identityEmbedding cannot be compared by the "
                         f"{scorer.name} scorer; send photos for similarity scores")
        for image in result.images:
            m, n = identity_similarity(scorer, reference, image) if scored else (None, None)
            sims.append(None if m is None else m.similarity)
            dists.append(None if m is None else m.distance)
            same.append(None if m is None else m.same)
            found.append(n)
        if not scorer.recognition_model:
            notes.append(scorer.label)
        result.extra["identity"] = {
            "source": prepared.source,
            "strength": result.request.identity_strength,
            "backend": self.engine.config.face_backend,
            "method": result.request.identity_method,  # which identity method produced the images
            "adapter": identity_adapter(model, result.request.identity_method).label,
            "referencePhotos": len(prepared.faces),
            "faces": copy.deepcopy(prepared.faces),  # prepared may be a cached object shared by requests
            "notes": notes + self._backend_notes(model, result.request.identity_method),
            "scorer": scorer.info(),
            "consistency": prepared.consistency,
            "referenceCheck": copy.deepcopy(prepared.check),
            "scored": scored,
            "similarity": sims,
            "distance": dists,
            "sameIdentity": same,
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
                         mismatched_photos=args.mismatched_photos, identity_method=args.identity_method,
                         **generation_kwargs(args))
    result = engine.generate(req)
    result.extra["identity"]["photoFiles"] = list(args.photos)
    write_outputs(result, args.output, "percify", mark=not args.no_mark)
    import sys

    print(identity_summary(result.extra["identity"]), file=sys.stderr)


def identity_summary(ident: dict) -> str:
    """One human-readable line per percify result: the scorer, its verdict rule and each image."""
    sc = ident.get("scorer") or {}
    parts = []
    for i, (sim, dist, same) in enumerate(zip(ident.get("similarity", []), ident.get("distance", []),
                                              ident.get("sameIdentity", []))):
        if sim is None:
            parts.append(f"image {i + 1}: no face found" if ident.get("scored", True) else f"image {i + 1}: not scored")
        else:
            parts.append(f"image {i + 1}: similarity {sim:.3f}, distance {dist:.3f} → "
                         f"{'same person' if same else 'NOT the same person'}")
    fallback = " [fallback: not a recognition model]" if sc.get("fallback") else ""
    return (f"identity by {sc.get('name')} ({sc.get('verdict')}){fallback}; reference photos "
            f"{'consistent' if (ident.get('referenceCheck') or {}).get('consistent', True) else 'INCONSISTENT'}: "
            + "; ".join(parts))


def add_cli(subparsers) -> None:
    from .cli import add_engine_args, add_generation_args

    p = subparsers.add_parser("percify", help="1..5 photos of one person + prompt → avatars with that face")
    p.add_argument("photos", nargs="+", help="reference photos (JPEG/PNG/WebP) of one person")
    p.add_argument("--prompt", default="a portrait of a person", help="what to make of the person")
    p.add_argument("--identity-strength", type=float, default=0.8,
                   help=f"{IDENTITY_STRENGTH_RANGE[0]:g}..{IDENTITY_STRENGTH_RANGE[1]:g}; 0 ignores the face")
    p.add_argument("--identity-method", choices=IDENTITY_METHODS, default=None,
                   help="faceid, faceid-plus-v2 (SD1.5/SDXL) or instantid (SDXL); default: the model's "
                        "(models.yaml identity_method); the model must offer it")
    p.add_argument("--mismatched-photos", choices=MISMATCH_POLICIES, default="refuse",
                   help="photos that are not the same person: refuse the request (default) or drop them with a note")
    add_generation_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_percify)
