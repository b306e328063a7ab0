"""One attention processor per layer, installed at load and never swapped.

Why: a compiled UNet guards on the objects and shapes its blocks see. The first engine swapped
processors per call (IP-Adapter in, regional processors in, peft LoRA enabled/disabled), so
every identity or cast request compiled new block graphs during live traffic and, past
dynamo's recompile limit, crashed (`FailOnRecompileLimitHit`), plain requests included once
peft had wrapped the UNet. Here every attention layer keeps one `AvatarAttnProcessor` for the
model's lifetime; what changes per call is data in the UNet's `CallConditioning`:

- `mode` picks one of three fixed code paths (a small, known set of graphs), and `method` the
  identity method whose weights the identity and regional paths read (faceid, faceid-plus-v2,
  instantid: each attached once at load under its name; one graph per mode and method):
  `plain` (text cross-attention only), `identity` (percify: + one FaceID identity per image and
  the FaceID LoRA) and `regional` (cast: 1 + MAX_CHARACTERS text prompts blended by region
  weights, + MAX_CHARACTERS masked identities). Cast always pads to MAX_CHARACTERS, so 2, 3 or
  4 characters, with or without faces, run one graph; an unused prompt or face has weight 0
  and adds exactly 0.0.
- Identity strength, the LoRA weight, region weights, face masks and face tokens are tensors,
  so their values never become guards (a Python float would recompile per strength).
- The FaceID LoRA is applied by the processor itself (rank-r `up(down(x))` times a weight
  tensor) instead of peft, so loading an adapter never rewraps the UNet's Linear layers.
  It costs two thin matmuls per projection in identity and regional calls only; the plain
  path never touches it.

The kernel is SDPA (PyTorch's fused attention: flash / memory-efficient on CUDA) unless the
profile asks for xformers; fused QKV projections are used whenever the layer has them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("plain", "identity", "regional")
MAX_CHARACTERS = 4
REGIONAL_PROMPTS = 1 + MAX_CHARACTERS  # background (scene) + one per character
KERNELS = ("sdpa", "xformers")


@dataclass
class CallConditioning:
    """What the current pipeline call adds to attention; read by every processor of one UNet.

    faces: [B, F, T, D] projected identity tokens (identity: F = 1; regional: F = MAX_CHARACTERS).
    face_scale / lora_weight: 0-d tensors. region_weights / face_masks: one tensor per UNet
    level (the latent halved `level` times), [B, REGIONAL_PROMPTS, seq, 1] and [B, F, seq, 1].
    B counts the unconditional half under classifier-free guidance."""

    mode: str = "plain"
    method: Optional[str] = None  # identity method whose weights the identity/regional paths use
    faces: Optional[torch.Tensor] = None
    face_scale: Optional[torch.Tensor] = None
    lora_weight: Optional[torch.Tensor] = None
    region_weights: tuple = ()
    face_masks: tuple = ()
    style_index: Optional[torch.Tensor] = None  # [B] style LoRA adapter per row (model/styles/stacked.py)
    style_scale: Optional[torch.Tensor] = None  # [B] its scale; None: no styled row in this call

    def reset(self) -> None:
        self.mode, self.method, self.faces, self.face_scale, self.lora_weight = "plain", None, None, None, None
        self.region_weights, self.face_masks = (), ()
        self.style_index = self.style_scale = None


class LoRAProjection(nn.Module):
    """`up(down(x))`, the FaceID checkpoints' LoRA on one projection (no alpha: scale 1)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class IdentityWeights(nn.Module):
    """A FaceID adapter's weights for one attention layer: LoRA on q/k/v/out (optional) and,
    on cross-attention layers, the identity key/value projections."""

    def __init__(self, lora: dict[str, LoRAProjection] | None, to_k_ip: nn.Linear | None, to_v_ip: nn.Linear | None):
        super().__init__()
        self.lora = nn.ModuleDict(lora) if lora else None
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[B, N, H·d] → [B, H, N, d]."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _grouped(x: torch.Tensor, batch: int, groups: int, heads: int) -> torch.Tensor:
    """[B, G·N, H·d] (G chunks of N tokens) → [B·G, H, N, d]: one attention per chunk."""
    n = x.shape[1] // groups
    d = x.shape[-1] // heads
    return x.view(batch, groups, n, heads, d).permute(0, 1, 3, 2, 4).reshape(batch * groups, heads, n, d)


class AvatarAttnProcessor(nn.Module):
    """Self- or cross-attention for one layer; see the module docstring for the modes."""

    def __init__(self, cond: CallConditioning, level: int, cross: bool, kernel: str = "sdpa"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS}")
        self.cond = cond
        self.level = level
        self.cross = cross
        self.kernel = kernel
        # Per identity method (faceid, faceid-plus-v2, instantid): attached at load, picked per
        # call by `cond.method` (a guard value: one graph per method, none per request).
        self.identities = nn.ModuleDict()
        # Stacked style LoRAs of this layer's q/k/v/out (model/styles/stacked.py), attached at load.
        self.styles = nn.ModuleDict()

    @property
    def identity(self) -> IdentityWeights | None:
        """Weights of the method the current call uses; outside a call, the first attached
        (None when no identity method is attached)."""
        method = self.cond.method
        if method is not None and method in self.identities:
            return self.identities[method]
        return next(iter(self.identities.values()), None)

    def __setattr__(self, name: str, value) -> None:
        # `proc.identity = weights` (single-method callers): attach under the current method
        # (default "faceid"); None detaches every method. nn.Module would register it as a child.
        if name == "identity":
            if value is None:
                self.identities.clear()
            else:
                self.identities[self.cond.method or "faceid"] = value
            return
        super().__setattr__(name, value)

    # ---- kernels -------------------------------------------------------------------------
    def _attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, S, H·d] queries over [B, N, H·d] keys/values → [B, S, H·d]."""
        batch, heads = q.shape[0], attn.heads
        if self.kernel == "xformers":
            import xformers.ops as xops

            d = k.shape[-1] // heads
            out = xops.memory_efficient_attention(q.reshape(batch, -1, heads, d), k.reshape(batch, -1, heads, d),
                                                  v.reshape(batch, -1, heads, d))
            return out.reshape(batch, -1, heads * d).to(q.dtype)
        out = F.scaled_dot_product_attention(_heads(q, batch, heads), _heads(k, batch, heads), _heads(v, batch, heads))
        return out.transpose(1, 2).reshape(batch, -1, q.shape[-1]).to(q.dtype)

    def _attend_grouped(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
        """One attention per token chunk, batched: → [B, groups, S, H·d]."""
        batch, heads = q.shape[0], attn.heads
        q4 = _heads(q, batch, heads)
        qg = q4.unsqueeze(1).expand(batch, groups, *q4.shape[1:]).reshape(batch * groups, *q4.shape[1:])
        out = F.scaled_dot_product_attention(qg, _grouped(k, batch, groups, heads), _grouped(v, batch, groups, heads))
        seq, inner = q.shape[1], q.shape[-1]
        return out.view(batch, groups, heads, seq, -1).permute(0, 1, 3, 2, 4).reshape(batch, groups, seq, inner)

    # ---- projections -----------------------------------------------------------------------
    def _weights(self) -> IdentityWeights | None:
        """The current call's identity weights (None in plain calls)."""
        if self.cond.mode == "plain":
            return None
        method = self.cond.method
        if method is None:  # a caller that names no method: the one attached first
            return next(iter(self.identities.values()), None)
        return self.identities[method] if method in self.identities else None

    def _lora(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ident = self._weights()
        lora = ident.lora if ident is not None else None
        if lora is None:
            return y
        return y + self.cond.lora_weight * lora[name](x)

    def _style(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """+ each row's style LoRA (its adapter and scale) when the call has styled rows."""
        index = self.cond.style_index
        if index is None or name not in self.styles:
            return y
        return y + self.styles[name](x, index, self.cond.style_scale)

    def _qkv(self, attn, hidden: torch.Tensor, context: torch.Tensor | None):
        if context is None:  # self-attention
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
                q, k, v = attn.to_qkv(hidden).chunk(3, dim=-1)
            else:
                q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
            source = hidden
        else:
            q = attn.to_q(hidden)
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
                k, v = attn.to_kv(context).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(context), attn.to_v(context)
            source = context
        q = self._style("q", hidden, self._lora("q", hidden, q))
        return q, self._style("k", source, self._lora("k", source, k)), self._style("v", source, self._lora("v", source, v))

    # ---- cross-attention extras --------------------------------------------------------------
    def _regional_text(self, attn, q, k, v) -> torch.Tensor:
        weights = self.cond.region_weights[self.level]  # [B, P, S, 1]
        out = self._attend_grouped(attn, q, k, v, REGIONAL_PROMPTS)
        return (out * weights).sum(dim=1)

    def _identities(self, attn, q: torch.Tensor) -> torch.Tensor:
        cond, ident = self.cond, self._weights()
        faces = cond.faces  # [B, F, T, D]
        batch, n_faces = faces.shape[0], faces.shape[1]
        flat = faces.reshape(batch, -1, faces.shape[-1])  # [B, F·T, D]
        out = self._attend_grouped(attn, q, ident.to_k_ip(flat), ident.to_v_ip(flat), n_faces)  # [B, F, S, C]
        if cond.mode == "regional":
            out = out * cond.face_masks[self.level]
        return out.sum(dim=1) * cond.face_scale

    # `__call__`, not `forward`, as diffusers' own module processors: Attention.forward reads the
    # accepted keyword names from its signature.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("AvatarAttnProcessor does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = encoder_hidden_states
        if context is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = self._qkv(attn, hidden_states, context)
        mode = self.cond.mode
        if context is not None and mode == "regional":
            out = self._regional_text(attn, q, k, v)
        else:
            out = self._attend(attn, q, k, v)
        ident = self._weights()
        if context is not None and ident is not None and ident.to_k_ip is not None:
            out = out + self._identities(attn, q)

        out = self._style("out", out, self._lora("out", out, attn.to_out[0](out)))
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------
# installing

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def unet_level(name: str, unet) -> int:
    """How many times the latent is halved where processor `name` runs: down block i at i, the
    mid block at the last down level, up block j at (n_up - 1 - j) (each block but the last
    up/downsamples at its end, with stride-2 convs that round up)."""
    m = _BLOCK.match(name)
    if m is None:
        raise ValueError(f"cannot place attention processor {name!r} in the UNet")
    n_down = len(unet.down_blocks)
    if m.group(1) is None:
        return n_down - 1
    index = int(m.group(2))
    return index if m.group(1) == "down_blocks" else len(unet.up_blocks) - 1 - index


def level_sizes(latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(h, w) of each UNet level for a latent of latent_hw."""
    h, w = latent_hw
    out = []
    for _ in range(levels):
        out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


def install_processors(model, kernel: str = "sdpa", levels: bool = True) -> CallConditioning:
    """Give every attention layer of `model` (a UNet, or the VAE with levels=False) its lifetime
    AvatarAttnProcessor; returns the conditioning they share (kept as `model.avatar_conditioning`)."""
    cond = CallConditioning()
    procs = {}
    for name in model.attn_processors:
        procs[name] = AvatarAttnProcessor(cond, unet_level(name, model) if levels else 0,
                                          cross=name.endswith("attn2.processor"), kernel=kernel)
    model.set_attn_processor(procs)
    model.avatar_conditioning = cond
    return cond


def processors(unet) -> dict[str, AvatarAttnProcessor]:
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, AvatarAttnProcessor)}


def conditioning(unet) -> CallConditioning:
    cond = getattr(unet, "avatar_conditioning", None)
    if cond is None:
        raise RuntimeError("this UNet has no AvatarAttnProcessors (install_processors was not called)")
    return cond


@dataclass
class Conditioned:
    """Context manager setting a UNet's per-call conditioning and always resetting it to plain."""

    cond: CallConditioning
    values: dict = field(default_factory=dict)

    def __enter__(self) -> CallConditioning:
        for key, value in self.values.items():
            setattr(self.cond, key, value)
        return self.cond

    def __exit__(self, *exc) -> None:
        self.cond.reset()


def conditioned(unet, **values) -> Conditioned:
    unknown = set(values) - set(CallConditioning.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown conditioning fields {sorted(unknown)}")
    if values.get("mode", "plain") not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    return Conditioned(conditioning(unet), values)


# ---------------------------------------------------------------------------------------------
# fused projections without a second copy

def fuse_projections(module: nn.Module) -> int:
    """Fuse q/k/v (self-attention) or k/v (cross-attention) of every Attention in `module` into
    one Linear, and make the separate projections views of the fused weight, so nothing is
    allocated twice and code that reads `to_q` still works. Returns the number of layers fused.
    (diffusers' `fuse_qkv_projections()` keeps full copies of both and replaces whatever
    processors are installed.)"""
    from diffusers.models.attention_processor import Attention

    fused = 0
    for attn in module.modules():
        if not isinstance(attn, Attention) or getattr(attn, "fused_projections", False):
            continue
        parts = [attn.to_k, attn.to_v] if attn.is_cross_attention else [attn.to_q, attn.to_k, attn.to_v]
        if attn.is_cross_attention and attn.to_k.weight.shape[1] != attn.to_v.weight.shape[1]:
            continue
        weight = torch.cat([p.weight.data for p in parts])
        bias = torch.cat([p.bias.data for p in parts]) if parts[0].bias is not None else None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        offset = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(linear.weight.data[offset:offset + n], requires_grad=False)
            if bias is not None:
                p.bias = nn.Parameter(linear.bias.data[offset:offset + n], requires_grad=False)
            offset += n
        setattr(attn, "to_kv" if attn.is_cross_attention else "to_qkv", linear)
        attn.fused_projections = True
        fused += 1
    return fused
