"""Tiny ONNX models with insightface's real signatures, so tests drive insightface's own
model_zoo routing, SCRFD decoding and ArcFaceONNX code without any downloaded weights."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2


class TinyRecognizer(nn.Module):
    """[N,3,112,112] → [N,512]; routed by insightface to ArcFaceONNX (square input ≥112)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc = nn.Linear(8 * 49, 512)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class PlantedSCRFD(nn.Module):
    """SCRFD signature (9 outputs: scores/bbox/kps for strides 8,16,32 with 2 anchors, static
    640×640 input). Its outputs are planted: exactly one anchor fires, with the given box and
    landmarks (in det-input pixels). It checks wiring (decoding, letterbox scaling, landmark
    order, alignment, embedding), not detection quality."""

    def __init__(self, box_det: np.ndarray, kps_det: np.ndarray, stride: int = 16):
        super().__init__()
        cx, cy = (box_det[0] + box_det[2]) / 2, (box_det[1] + box_det[3]) / 2
        col, row = int(round(cx / stride)), int(round(cy / stride))
        ax, ay = col * stride, row * stride
        self.layers = []
        for i, s in enumerate(STRIDES):
            n = (DET_SIZE // s) ** 2 * ANCHORS
            score = torch.full((n, 1), -12.0)
            bbox = torch.ones(n, 4)
            kps = torch.zeros(n, 10)
            if s == stride:
                idx = (row * (DET_SIZE // s) + col) * ANCHORS
                score[idx, 0] = 8.0
                bbox[idx] = torch.tensor([ax - box_det[0], ay - box_det[1], box_det[2] - ax, box_det[3] - ay]) / s
                kps[idx] = torch.tensor((kps_det - np.array([ax, ay])).reshape(-1) / s, dtype=torch.float32)
            self.register_buffer(f"score{i}", score)
            self.register_buffer(f"bbox{i}", bbox)
            self.register_buffer(f"kps{i}", kps)

    def forward(self, x):
        zero = x.mean() * 0.0  # keeps the input in the graph
        scores = [torch.sigmoid(getattr(self, f"score{i}") + zero) for i in range(3)]
        bboxes = [getattr(self, f"bbox{i}") + zero for i in range(3)]
        kpss = [getattr(self, f"kps{i}") + zero for i in range(3)]
        return (*scores, *bboxes, *kpss)


def export_tiny_pack(folder: str, box_det: np.ndarray, kps_det: np.ndarray) -> tuple[str, str]:
    """Write det_10g.onnx (planted SCRFD) and w600k_r50.onnx (tiny ArcFace) into folder."""
    os.makedirs(folder, exist_ok=True)
    det_path = os.path.join(folder, "det_10g.onnx")
    rec_path = os.path.join(folder, "w600k_r50.onnx")
    det = PlantedSCRFD(np.asarray(box_det, np.float32), np.asarray(kps_det, np.float32)).eval()
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(det, torch.zeros(1, 3, DET_SIZE, DET_SIZE), det_path, input_names=["input.1"],
                      output_names=names, dynamo=False, opset_version=17)
    rec = TinyRecognizer().eval()
    torch.onnx.export(rec, torch.zeros(1, 3, 112, 112), rec_path, input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
                      dynamo=False, opset_version=17)
    return det_path, rec_path
