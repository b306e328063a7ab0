"""Production face backend: insightface's ONNX detector (SCRFD/RetinaFace) and ArcFace
recogniser, run by onnxruntime (CUDA when available, else CPU).

Never downloads: the model folder must already hold the ONNX files. The packaged insightface
models (buffalo_l, antelopev2) are licensed for non-commercial research only — and so are the
IP-Adapter FaceID weights trained on them; keep the backend swappable for commercial use.
"""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from ..errors import ProfileError
from .base import Face, FaceAnalyzer, l2_normalize, to_rgb_array

#: Files a standard insightface pack provides (detector, recogniser); others are ignored.
KNOWN_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "buffalo_m": ("det_2.5g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}


def default_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_model_dir(model_root: str, name: str) -> str | None:
    """insightface's layout is <root>/models/<name>; <root>/<name> is accepted too."""
    root = os.path.expanduser(model_root)
    for candidate in (os.path.join(root, "models", name), os.path.join(root, name)):
        if os.path.isdir(candidate) and glob.glob(os.path.join(candidate, "*.onnx")):
            return candidate
    return None


def _missing_message(model_root: str, name: str, detail: str) -> str:
    files = KNOWN_PACKS.get(name, ("<detector>.onnx", "<recognition>.onnx"))
    where = os.path.join(os.path.expanduser(model_root), "models", name)
    return (f"insightface model pack {name!r} {detail}. Download it yourself (nothing is downloaded "
            f"automatically) and put {', '.join(files)} in {where}/ — e.g. unzip buffalo_l.zip from "
            "the insightface model zoo into that folder. Note: insightface's packaged models are "
            "licensed for non-commercial research only.")


class InsightFaceAnalyzer(FaceAnalyzer):
    """Wraps insightface model_zoo models: one detector with 5-point landmarks and one
    ArcFace recogniser found among the *.onnx files of the pack folder."""

    name = "insightface"

    def __init__(self, model_root: str = "~/.insightface", name: str = "buffalo_l", providers=None,
                 det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5):
        try:
            from insightface.model_zoo import model_zoo
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ProfileError("the insightface backend needs `pip install --no-deps insightface onnx "
                               "onnxruntime` (or onnxruntime-gpu)", param="faceBackend") from exc
        model_dir = resolve_model_dir(model_root, name)
        if model_dir is None:
            raise ProfileError(_missing_message(model_root, name, "was not found"), param="faceBackend")
        self.model_dir = model_dir
        self.providers = list(providers) if providers else default_providers()
        self.detector = None
        self.recognizer = None
        for path in sorted(glob.glob(os.path.join(model_dir, "*.onnx"))):
            model = model_zoo.get_model(path, providers=self.providers)
            task = getattr(model, "taskname", None)
            if task == "detection" and self.detector is None:
                self.detector = model
            elif task == "recognition" and self.recognizer is None:
                self.recognizer = model
        if self.detector is None or self.recognizer is None:
            lacking = "a face detector" if self.detector is None else "an ArcFace recognition model"
            raise ProfileError(_missing_message(model_root, name, f"in {model_dir} lacks {lacking}"),
                               param="faceBackend")
        if not getattr(self.detector, "use_kps", True):
            raise ProfileError(f"the detector in {model_dir} outputs no landmarks; alignment needs "
                               "a 5-point (…kps) SCRFD/RetinaFace model", param="faceBackend")
        ctx_id = 0 if self.providers[0] == "CUDAExecutionProvider" else -1
        self.detector.prepare(ctx_id, input_size=tuple(det_size), det_thresh=det_thresh)
        self.recognizer.prepare(ctx_id)

    def detect(self, image: Image.Image | np.ndarray) -> list[Face]:
        from insightface.app.common import Face as IFFace

        bgr = np.ascontiguousarray(to_rgb_array(image)[..., ::-1])  # insightface works in BGR
        bboxes, kpss = self.detector.detect(bgr, max_num=0)
        faces = []
        for i in range(bboxes.shape[0]):
            kps = np.asarray(kpss[i], dtype=np.float32)
            f = IFFace(bbox=bboxes[i, :4], kps=kps, det_score=bboxes[i, 4])
            emb = self.recognizer.get(bgr, f)
            faces.append(Face(bbox=tuple(float(v) for v in bboxes[i, :4]), kps=kps,
                              det_score=float(bboxes[i, 4]), embedding=l2_normalize(emb)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces
