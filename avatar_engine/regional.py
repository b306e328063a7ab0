"""Regional conditioning for one denoising pass: each character's prompt (and FaceID identity)
acts only inside its region, the scene prompt everywhere else.

How: the text conditioning of a call is the scene prompt embedding followed by one embedding
per character, concatenated along the token axis (`[B, (1+K)·77, D]`). `RegionalAttnProcessor`
replaces every cross-attention processor for the duration of the call; it attends to each
77-token chunk separately and blends the K+1 outputs per pixel with the region weights
downsampled (area average) to the layer's resolution: weight w_k inside character k's region,
1 − Σw_k for the background (scene prompt). Identity follows diffusers' masked IP-Adapter
semantics: one FaceID embedding per character in one adapter, each added through its mask
(`ip_adapter_masks`, produced with `IPAdapterMaskProcessor`, downsampled with
`IPAdapterMaskProcessor.downsample`), so a face cannot leak outside its region and a face under
an all-zero mask contributes exactly 0.0.

Overlapping regions split the overlap: pixel weights are normalised so Σw_k ≤ 1 everywhere,
which keeps prompts and identities from being added on top of each other.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1

LAYOUT_MARGIN = 0.04  # outer margin of automatic layouts (fraction of the side)
LAYOUT_GAP = 0.03  # gap between neighbouring regions
LAYOUT_HEADROOM = 0.06  # free band above side-by-side characters
LAYOUTS = ("auto", "columns", "rows", "custom")


def auto_layout(n: int, width: int, height: int, mode: str = "auto") -> list[Box]:
    """n regions for an image of width×height.

    auto: side-by-side columns for landscape and square frames (people stand next to each
    other, and a column is the shape of a standing or seated person); stacked rows for portrait
    frames with 3-4 characters, where columns would be slivers (9:16 with 4 columns gives each
    person 14 % of the width). Regions keep a margin to the frame and a gap between them so
    neighbouring identities do not touch."""
    if n < 1:
        raise ValueError("auto_layout needs at least one region")
    if mode == "auto":
        mode = "rows" if height > width and n >= 3 else "columns"
    m, g = LAYOUT_MARGIN, LAYOUT_GAP
    boxes: list[Box] = []
    if mode == "columns":
        w = (1.0 - 2 * m - g * (n - 1)) / n
        for i in range(n):
            x0 = m + i * (w + g)
            boxes.append((x0, LAYOUT_HEADROOM, x0 + w, 1.0))
    elif mode == "rows":
        h = (1.0 - 2 * m - g * (n - 1)) / n
        for i in range(n):
            y0 = m + i * (h + g)
            boxes.append((m, y0, 1.0 - m, y0 + h))
    else:
        raise ValueError(f"unknown layout mode {mode!r}")
    return [tuple(round(v, 4) for v in b) for b in boxes]  # type: ignore[misc]


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle [x0, x1) × [y0, y1) of a normalised box, at least one pixel wide."""
    x0 = min(width - 1, max(0, int(round(box[0] * width))))
    y0 = min(height - 1, max(0, int(round(box[1] * height))))
    x1 = max(x0 + 1, min(width, int(round(box[2] * width))))
    y1 = max(y0 + 1, min(height, int(round(box[3] * height))))
    return x0, y0, x1, y1


def box_overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area (1.0: one box inside the other)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return (iw * ih) / smaller if smaller > 0 else 0.0


def region_masks(boxes: Sequence[Box], width: int, height: int) -> torch.Tensor:
    """[K, H, W] float32 pixel weights: 1 inside a box, overlaps split evenly (Σ ≤ 1).

    Rasterised through diffusers' IPAdapterMaskProcessor (the format `ip_adapter_masks` wants)."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image, ImageDraw

    images = []
    for box in boxes:
        img = Image.new("L", (width, height), 0)
        x0, y0, x1, y1 = pixel_box(box, width, height)
        ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        images.append(img)
    masks = IPAdapterMaskProcessor().preprocess(images, height=height, width=width)[:, 0].float()  # [K, H, W]
    return normalise_overlaps(masks)


def normalise_overlaps(masks: torch.Tensor) -> torch.Tensor:
    """Divide by Σ_k where regions overlap, so the weights of one pixel never exceed 1.
    A region of zeros stays zeros and leaves the others untouched."""
    total = masks.sum(dim=-3, keepdim=True)
    return torch.where(total > 1.0, masks / total.clamp(min=1.0), masks)


def _layer_size(seq: int, latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention layer with `seq` queries: the latent halved (ceil, as the UNet's
    stride-2 convs do) until it matches; otherwise diffusers' aspect-ratio guess."""
    h, w = latent_hw
    while h * w > seq and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w == seq:
        return h, w
    ratio = image_hw[1] / image_hw[0]
    mh = max(1, int(math.sqrt(seq / ratio)))
    mh = mh + int(seq % mh != 0)
    return mh, seq // mh


@dataclass
class RegionalState:
    """Per-call region weights shared by every RegionalAttnProcessor of the UNet.

    masks: [B, K, H, W] pixel weights per image of the call (B counts the unconditional half
    under CFG). latent_hw: the latent's (h, w); attention layers run at it halved 0..n times.
    weights_by_seq: [B, K+1, seq, 1] blend weights per layer size, filled by `precompute()`
    before the call so the processors (possibly compiled) only read them."""

    masks: torch.Tensor
    latent_hw: tuple[int, int]
    weights_by_seq: dict = field(default_factory=dict, repr=False)

    @property
    def n_prompts(self) -> int:
        return self.masks.shape[1] + 1

    def _compute(self, seq: int) -> torch.Tensor:
        h, w = _layer_size(seq, self.latent_hw, tuple(self.masks.shape[-2:]))
        m = F.interpolate(self.masks.to(torch.float32), size=(h, w), mode="area").flatten(2)  # [B, K, seq]
        background = (1.0 - m.sum(dim=1, keepdim=True)).clamp(min=0.0)
        return torch.cat([background, m], dim=1).unsqueeze(-1)

    def precompute(self, device, dtype) -> "RegionalState":
        """Weights for every layer size the UNet can have (the latent halved until 1×1)."""
        h, w = self.latent_hw
        self.weights_by_seq = {}
        while True:
            self.weights_by_seq[h * w] = self._compute(h * w).to(device=device, dtype=dtype)
            if h == 1 and w == 1:
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return self

    def weights(self, seq: int, batch: int, device, dtype) -> torch.Tensor:
        """[batch, K+1, seq, 1]: background weight first, then one per character."""
        wts = self.weights_by_seq.get(seq)
        if wts is None:  # a layer size precompute() did not foresee
            wts = self._compute(seq)
        if wts.shape[0] != batch:
            wts = wts.repeat(batch // wts.shape[0], 1, 1, 1)
        return wts.to(device=device, dtype=dtype)


def _sdpa(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: int) -> torch.Tensor:
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class RegionalAttnProcessor:
    """Cross-attention with one prompt per region, plus masked IP-Adapter identities.

    `ip` is the IP-Adapter processor it replaces (when an identity adapter is active): its
    to_k_ip/to_v_ip weights and scale are used as they are, so nothing is copied."""

    def __init__(self, state: RegionalState, ip=None):
        self.state = state
        self.ip = ip

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, scale: float = 1.0, ip_adapter_masks=None):
        if encoder_hidden_states is None:
            raise ValueError("RegionalAttnProcessor is for cross-attention layers only")
        if attention_mask is not None:
            raise ValueError("regional prompting does not support text attention masks")
        ip_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        text = encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        n = self.state.n_prompts
        if text.shape[1] % n:
            raise ValueError(f"text conditioning of {text.shape[1]} tokens does not split into {n} prompts")
        key, value = attn.to_k(text), attn.to_v(text)
        inner = key.shape[-1]
        q = query.view(batch, -1, attn.heads, inner // attn.heads).transpose(1, 2)
        weights = self.state.weights(seq, batch, query.device, query.dtype)
        out = None
        for i, (k, v) in enumerate(zip(key.chunk(n, dim=1), value.chunk(n, dim=1))):
            term = _sdpa(attn, q, k, v, batch) * weights[:, i]
            out = term if out is None else out + term
        hidden_states = out

        if ip_states is not None and self.ip is not None:
            hidden_states = self._identities(attn, q, hidden_states, ip_states, ip_adapter_masks, batch, seq)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _identities(self, attn, q, hidden_states, ip_states, ip_adapter_masks, batch, seq):
        """diffusers' IPAdapterAttnProcessor2_0 masked branch. Every face is computed (no branch
        on which characters have one, so a compiled graph serves every cast); a face under a
        zero mask adds exactly 0.0."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        masks = ip_adapter_masks if ip_adapter_masks is not None else [None] * len(ip_states)
        for state, scale, to_k_ip, to_v_ip, mask in zip(ip_states, self.ip.scale, self.ip.to_k_ip,
                                                        self.ip.to_v_ip, masks):
            scales = scale if isinstance(scale, list) else None
            if (scales is not None and all(s == 0 for s in scales)) or (scales is None and scale == 0):
                continue
            if mask is None:
                flat = state.reshape(batch, -1, state.shape[-1])
                hidden_states = hidden_states + scale * _sdpa(attn, q, to_k_ip(flat), to_v_ip(flat), batch)
                continue
            scales = scales or [scale] * mask.shape[1]
            for i in range(mask.shape[1]):
                face = state[:, i]
                o = _sdpa(attn, q, to_k_ip(face), to_v_ip(face), batch)
                # [batch, seq, 1], broadcast over channels (diffusers repeats it to the channel count)
                down = IPAdapterMaskProcessor.downsample(mask[:, i, :, :], batch, seq, 1).to(q.device, q.dtype)
                hidden_states = hidden_states + scales[i] * (o * down)
        return hidden_states


_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forget_processors(unet) -> None:
    """Drop the processors cached for `unet`: they hold the IP-Adapter processors they wrap
    (and so their weights), which must go when the adapter is unloaded."""
    _PROCESSORS.pop(unet, None)


@contextlib.contextmanager
def regional_attention(unet, state: RegionalState):
    """Install RegionalAttnProcessor on every cross-attention layer for the duration of the
    block (wrapping an active IP-Adapter processor), then put the previous processors back.

    The processor objects and the state they read are kept per UNet and reused, with only the
    state's tensors replaced per call: a compiled UNet (torch.compile guards on the processor
    objects) then compiles cast once per shape instead of on every call."""
    cached = _PROCESSORS.setdefault(unet, {"state": RegionalState(masks=state.masks, latent_hw=state.latent_hw),
                                           "procs": {}})
    shared: RegionalState = cached["state"]
    shared.masks, shared.latent_hw = state.masks, state.latent_hw
    shared.precompute(unet.device, unet.dtype)
    saved = dict(unet.attn_processors)
    procs = {}
    for name, proc in saved.items():
        if name.endswith("attn2.processor"):
            ip = proc if hasattr(proc, "to_k_ip") else None
            key = (name, ip)
            if key not in cached["procs"]:
                cached["procs"][key] = RegionalAttnProcessor(shared, ip)
            procs[name] = cached["procs"][key]
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    try:
        yield shared
    finally:
        unet.set_attn_processor(dict(saved))
        shared.masks, shared.weights_by_seq = shared.masks[:0], {}  # keep no per-call tensors alive
