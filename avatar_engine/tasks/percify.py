"""Percify-yourself: identity-preserving avatars from 1..5 photos of one person.

Per request (`PercifyTask.prepare`): each reference photo goes through the engine's face
analyzer (no face → error naming the photo; several → the largest, noted; too small → error);
the photos' embeddings combine into one identity (normed mean). Each image of the request then
carries that 512-d identity as its conditioning, so percify requests batch with each other
(one row of `ip_adapter_image_embeds` per image) and a request's images are the same whether
it ran alone or packed with others.

Identity method (`identity_method`: faceid, faceid-plus-v2, instantid; model/adapters/) is chosen per
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

Every result carries an `IdentityReport` (`result.report`, reports.py): faces found per photo, which was used, the scorer
(`scorer`: name, metric, threshold, whether it is the unreliable fallback), the reference photos'
consistency, and per output image, against the reference photos' scorer centroid: `similarity`
(cosine of the scorer's descriptors), `distance` (the scorer's metric) and `sameIdentity` (its
verdict) for the largest face the scorer finds in the output (null when it finds none).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Sequence

import numpy as np

from ..model.adapters import identity_adapter, keypoint_images, kps_in_frame
from ..model.attention import conditioned
from ..requests import GenerationRequest, GenerationResult, PercifyRequest
from ..runtime.scheduler import LoadedModel, WorkItem, uses_cfg
from .generate import GenerateTask
from .identity import IdentityConditioning, identity_similarity
from .reports import IdentityReport


class PercifyTask(GenerateTask):
    """Percify-yourself on any profile with an `ip_adapter`."""

    name = "percify"

    # ---- per request ----------------------------------------------------------------------
    def prepare(self, model: LoadedModel, request: PercifyRequest) -> IdentityConditioning:
        adapter = identity_adapter(model, request.identity_method)  # loaded at load; fails early without one
        if request.identity_embedding is not None:
            return IdentityConditioning(embedding=np.asarray(request.identity_embedding, np.float32),
                                        source="embedding")
        return self.engine.identity.analyze(request.photos, model.profile.face_min_size, crops=adapter.needs_crops,
                                            mismatched=request.mismatched_photos)

    def group_key(self, request: GenerationRequest) -> tuple:
        """The base key plus the identity method (one method per call: it picks the weights).
        Strength is a per-image tensor (adapter.weights), so requests of any strength share calls."""
        return super().group_key(request) + (request.identity_method,)

    # ---- per pipeline call ------------------------------------------------------------------
    def run(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem],
            callback: Callable | None) -> list:
        first = requests[items[0].request_index]
        adapter = identity_adapter(model, first.identity_method)
        cfg = uses_cfg(model, first.guidance_scale)
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
        identity = self.engine.identity
        scorer = identity.scorer
        notes = list(prepared.notes)
        reference = identity.scoring_reference(prepared, prepared.embedding if prepared.source == "embedding" else None)
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
        method = result.request.identity_method
        result.report = IdentityReport(
            source=prepared.source, strength=result.request.identity_strength,
            backend=self.engine.config.face_backend, method=method,
            adapter=identity_adapter(model, method).label, reference_photos=len(prepared.faces),
            faces=copy.deepcopy(prepared.faces),  # prepared may be a cached object shared by requests
            notes=notes + self._backend_notes(model, method), scorer=scorer.info(),
            consistency=prepared.consistency, reference_check=copy.deepcopy(prepared.check), scored=scored,
            similarity=sims, distance=dists, same_identity=same, output_faces=found)
