"""Scorer descriptors of reference photos, cached by pixel content for the whole process:
request validation (at submit, no engine) and the engine's prepare step see the same photos,
so each photo is described once."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Sequence

from .scoring import FaceScorer, ReferenceCheck, check_same_person

DESCRIPTOR_CACHE_SIZE = 64
_DESCRIPTORS: OrderedDict = OrderedDict()
_DESCRIPTORS_LOCK = threading.Lock()


def image_digest(image) -> str:
    """A content key of a PIL image (size, mode and pixels)."""
    h = hashlib.sha1(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def reference_descriptor(scorer: FaceScorer, image):
    """The scorer's descriptor of the largest face in a reference photo (None: no face)."""
    key = (id(scorer), image_digest(image))
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


def check_reference_identity(scorer: FaceScorer, images: Sequence, param: str = "photos",
                             policy: str = "refuse") -> ReferenceCheck:
    """Reference photos → `ReferenceCheck` (refuses or drops photos of another person, see
    `scoring.check_same_person`)."""
    return check_same_person(scorer, [reference_descriptor(scorer, im) for im in images], param=param, policy=policy)
