"""MTCNN face detector (Zhang et al. 2016) running on CPU with torch.

Why this exists: the embedded backend needs a *real* face detector with 5-point landmarks
(ArcFace order) that works offline. The pretrained MTCNN weights ship inside the
``facenet-pytorch`` wheel (MIT licence, 2 MB, ``facenet_pytorch/data/{p,r,o}net.pt``). That
package imports torchvision at import time, so it is installed with ``--no-deps`` and never
imported: we only locate its data files and load them as plain state dicts
(``torch.load(weights_only=True)``) into the small networks defined here.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

WEIGHTS_PACKAGE = "facenet-pytorch"
INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"


def mtcnn_weights_dir() -> str | None:
    """Folder holding pnet.pt/rnet.pt/onet.pt, or None when facenet-pytorch is absent."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        folder = os.path.join(base, "data")
        if all(os.path.isfile(os.path.join(folder, f"{n}.pt")) for n in ("pnet", "rnet", "onet")):
            return folder
    return None


class _PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class _RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # weights were converted from Caffe (W,H)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class _ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, method: str = "union") -> np.ndarray:
    """Greedy NMS; 'min' divides by the smaller area (MTCNN's last stage)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Cut each (integer) box out of img, zero-padding outside, resized to size×size."""
    h, w = img.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for k, b in enumerate(boxes.astype(np.int64)):
        x0, y0, x1, y1 = int(b[0]), int(b[1]), int(b[2]) + 1, int(b[3]) + 1
        if x1 <= x0 or y1 <= y0:
            continue
        canvas = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    t = torch.from_numpy(out).permute(0, 3, 1, 2)
    return (t - 127.5) * 0.0078125


@dataclass
class MTCNNDetections:
    boxes: np.ndarray   # [N, 4] x0, y0, x1, y1
    scores: np.ndarray  # [N]
    points: np.ndarray  # [N, 5, 2] left eye, right eye, nose, left mouth, right mouth


class MTCNN:
    """Three-stage cascade CNN: proposal (PNet), refine (RNet), output + landmarks (ONet)."""

    def __init__(self, weights_dir: str, *, min_face: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), factor: float = 0.709):
        self.min_face = min_face
        self.thresholds = thresholds
        self.factor = factor
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            state = torch.load(os.path.join(weights_dir, f"{name}.pt"), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("softmax")}
            net.load_state_dict(state)
            net.eval()

    @torch.inference_mode()
    def detect(self, img: np.ndarray) -> MTCNNDetections:
        """img: HxWx3 uint8 RGB."""
        h, w = img.shape[:2]
        m = 12.0 / self.min_face
        scales, minl = [], min(h, w) * m
        s = m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor
        empty = MTCNNDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                np.zeros((0, 5, 2), np.float32))
        # Stage 1: fully convolutional proposals over the pyramid.
        props = []
        for scale in scales:
            hs, ws = int(h * scale + 1), int(w * scale + 1)
            im = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA).astype(np.float32)
            t = (torch.from_numpy(im).permute(2, 0, 1)[None] - 127.5) * 0.0078125
            reg, prob = self.pnet(t)
            prob = prob[0, 1].numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(ys) == 0:
                continue
            score = prob[ys, xs]
            r = reg[0].numpy()[:, ys, xs].T
            q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / scale)
            q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / scale)
            b = np.concatenate([q1, q2, score[:, None], r], 1)
            b = b[_nms(b[:, :4], b[:, 4], 0.5)]
            props.append(b)
        if not props:
            return empty
        b = np.concatenate(props)
        b = b[_nms(b[:, :4], b[:, 4], 0.7)]
        boxes = _square(_regress(b[:, :4], b[:, 5:9]))
        # Stage 2: refine.
        reg, prob = self.rnet(_crops(img, np.trunc(boxes), 24))
        score = prob[:, 1].numpy()
        keep = score > self.thresholds[1]
        boxes, score, reg = boxes[keep], score[keep], reg.numpy()[keep]
        if len(boxes) == 0:
            return empty
        k = _nms(boxes, score, 0.7)
        boxes = _square(_regress(boxes[k], reg[k]))
        # Stage 3: output boxes and 5 landmarks.
        boxes = np.trunc(boxes)
        reg, pts, prob = self.onet(_crops(img, boxes, 48))
        score = prob[:, 1].numpy()
        keep = score > self.thresholds[2]
        boxes, score, reg, pts = boxes[keep], score[keep], reg.numpy()[keep], pts.numpy()[keep]
        if len(boxes) == 0:
            return empty
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        px = bw * pts[:, :5] + boxes[:, 0:1]
        py = bh * pts[:, 5:] + boxes[:, 1:2]
        points = np.stack([px, py], -1)
        boxes = _regress(boxes, reg)
        k = _nms(boxes, score, 0.7, "min")
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
        return MTCNNDetections(boxes[k].astype(np.float32), score[k].astype(np.float32),
                               points[k].astype(np.float32))
