"""IP-Adapter FaceID on a loaded pipeline: loaded once at model load, into the lifetime
attention processors (attention.py), and switched per call by data, not by swapping modules.

What a FaceID checkpoint holds (h94/IP-Adapter-FaceID, `{"image_proj": ..., "ip_adapter": ...}`):
an image projection (512-d ArcFace identity → 4 tokens), per cross-attention layer the identity
key/value projections `{i}.to_k_ip` / `{i}.to_v_ip`, and per attention layer a LoRA
`{i}.to_{q,k,v,out}_lora.{down,up}` (rank 128 in the released files), where i enumerates
`unet.attn_processors`. We read the file ourselves and hand each layer its weights
(`IdentityWeights`); the projection runs once per call (diffusers runs it at every step), and
the LoRA is applied by the processor with a weight tensor. No peft, no processor swaps, so a
compiled UNet keeps its graphs (see attention.py for why that matters).

Identity tokens layout for one call: `[B, F, T, D]`, F faces per image (percify: 1; cast:
MAX_CHARACTERS), with the unconditional half first under classifier-free guidance (the
projection of a zero identity, as diffusers does).

Identity methods (models.yaml `identity_methods`, one `IdentityAdapter` each, all attached to
the same lifetime processors under their method name; a call picks one by `CallConditioning.method`):
- `faceid`: `h94/IP-Adapter-FaceID` `ip-adapter-faceid_sd15.bin` / `ip-adapter-faceid_sdxl.bin`
  (hub id or a local directory; `.bin` or `.safetensors`). `tiny: true`: seeded random weights
  of the real key layout built in-process for the UNet at hand (`lora_rank: 128` gives the
  released files' layout); `write_faceid_checkpoint` writes them in the h94 format.
- `faceid-plus-v2`: `ip-adapter-faceid-plusv2_sd15.bin` / `_sdxl.bin` (+ its LoRA, in the same
  file) and a CLIP image encoder (`image_encoder`: `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, or
  `h94/IP-Adapter` with `image_encoder_subfolder: models/image_encoder`). The projection is
  diffusers' `IPAdapterFaceIDPlusImageProjection` (a perceiver over the penultimate CLIP hidden
  states of the aligned 224 px face crop, queried by the FaceID tokens) with `shortcut=True` —
  the "v2": identity tokens + `shortcut_scale` × the CLIP branch. `tiny: true` writes a tiny CLIP
  vision model (from config) and a checkpoint in the original key layout to the cache and loads
  them back through this same code.
- `instantid` (SDXL): `InstantX/InstantID` `ip-adapter.bin` (image_proj: a Resampler, 16 tokens
  from the 512-d antelopev2 embedding; ip_adapter: `{i}.to_k_ip` / `{i}.to_v_ip`, no LoRA) and the
  IdentityNet `ControlNetModel/` (diffusers ControlNetModel), conditioned on the face-keypoints
  image (`draw_kps`, as InstantID draws it) with the identity tokens as its text. Its residuals
  enter the UNet call as `down_block_additional_residuals` / `mid_block_additional_residual`
  through a forward pre-hook held only for the call (`IdentityNet.applied`), as diffusers'
  community `pipeline_stable_diffusion_xl_instantid.py` passes them. `tiny: true` writes a tiny
  ControlNet (from the UNet's config, random zero-convs so it does something) and checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from ...config import IPAdapterSource
from ...errors import ProfileError, RequestValidationError
from ...identity_methods import IDENTITY_METHODS, METHODS
from ...requests.common import EMBEDDING_DIM as FACEID_EMBED_DIM
from .checkpoints import (attach_identity_weights, checkpoint_path, convert_image_projection, detach_identity_weights,
                          read_checkpoint)
from .instantid import IdentityNet
from .tiny_weights import TINY_LORA_RANK, tiny_faceid_state_dict, tiny_method_files

log = logging.getLogger(__name__)


class IdentityAdapter:
    """One identity method attached to one pipeline's UNet processors (under its method name).

    Shared by percify (one face per image) and cast (several faces per image, each under its
    region mask): both turn identities into tokens with `tokens()` and pass them, with the
    per-image strengths from `weights()`, in the call's conditioning (`method=adapter.method`)."""

    def __init__(self, pipe, src: IPAdapterSource, profile_name: str = "?", *, download: bool = False):
        method = src.variant
        if method not in METHODS:
            raise ProfileError(f"profile {profile_name!r}: identity method must be one of {IDENTITY_METHODS}",
                               param="model")
        if method == "faceid-plus-v2" and not (src.image_encoder or src.tiny):
            raise ProfileError(f"profile {profile_name!r}: faceid-plus-v2 needs image_encoder "
                               f"(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", param="model")
        if method == "instantid" and not hasattr(pipe, "text_encoder_2"):
            raise ProfileError(f"profile {profile_name!r}: instantid needs an SDXL pipeline", param="model")
        self.source = src
        if src.tiny and method != "faceid":  # write the real layout to disk, then load it like real files
            src = dataclasses.replace(src, **tiny_method_files(method, pipe.unet))
        if src.tiny and method == "faceid":
            state = tiny_faceid_state_dict(pipe.unet, lora_rank=src.lora_rank or TINY_LORA_RANK)
        else:
            path = checkpoint_path(src, profile_name, download=download)
            try:
                state = read_checkpoint(path)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ProfileError(f"profile {profile_name!r}: could not read {method} weights {path!r} "
                                   f"({type(exc).__name__}: {exc})", param="model") from exc
        self.pipe = pipe
        self.method = method
        self.variant = method
        self.lora_scale = float(src.lora_scale)
        self.control_scale = float(src.controlnet_scale)
        unet = pipe.unet
        param = next(unet.parameters())
        projection = convert_image_projection(unet, state["image_proj"])
        self.projection = projection.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
        self.image_encoder = self.feature_extractor = None
        self.identitynet: IdentityNet | None = None
        if method == "faceid-plus-v2":
            from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

            if not isinstance(self.projection, IPAdapterFaceIDPlusImageProjection):
                raise ProfileError(f"profile {profile_name!r}: {path!r} is not a FaceID Plus checkpoint "
                                   f"(no perceiver_resampler keys)", param="model")
            self.projection.shortcut = True  # the "v2" in Plus v2
            self.projection.shortcut_scale = float(src.shortcut_scale)
            self._load_image_encoder(src, profile_name, download)
        if method == "instantid":
            self._load_identitynet(src, profile_name, download)
        self.lora_rank = attach_identity_weights(unet, state["ip_adapter"], profile_name, method)
        self.loaded = True
        log.info("identity method %s loaded (%s), LoRA rank %s", method,
                 "random weights" if self.source.tiny else (src.local_path or src.repo_id), self.lora_rank)

    @property
    def label(self) -> str:
        return f"{self.method}{' (random weights)' if self.source.tiny else ''}"

    @property
    def needs_crops(self) -> bool:
        """Plus v2 reads the aligned face crop through CLIP: it needs reference photos."""
        return METHODS[self.method].needs_photos

    @property
    def tokens_per_face(self) -> int:
        return METHODS[self.method].tokens_per_face

    def _source_folder(self, src: IPAdapterSource, name: str, subfolder: str | None, profile_name: str) -> str:
        """A model folder: `name` itself when it is a local directory, else inside local_path,
        else a hub repo snapshot (name, or the adapter's repo with a subfolder)."""
        if os.path.isdir(name):
            return os.path.join(name, subfolder or "")
        if src.local_path and os.path.isdir(os.path.join(src.local_path, name)):
            return os.path.join(src.local_path, name, subfolder or "")
        return name

    def _load_image_encoder(self, src: IPAdapterSource, profile_name: str, download: bool) -> None:
        """Plus v2: the CLIP vision encoder (ViT-H for the released files) and its processor."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        where = self._source_folder(src, src.image_encoder, src.image_encoder_subfolder, profile_name)
        kwargs = {} if os.path.isdir(where) or not src.image_encoder_subfolder else {"subfolder": src.image_encoder_subfolder}
        kwargs["local_files_only"] = not download  # a request reads the hub cache, never the hub
        param = next(self.pipe.unet.parameters())
        try:
            enc = CLIPVisionModelWithProjection.from_pretrained(where, dtype=param.dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"profile {profile_name!r}: could not load image encoder {src.image_encoder!r}: "
                               f"download it with `huggingface-cli download {src.image_encoder}`. ({exc})",
                               param="model") from exc
        try:
            self.feature_extractor = CLIPImageProcessor.from_pretrained(where, **kwargs)
        except (OSError, ValueError):  # the ViT-H repos may lack a preprocessor file: CLIP's defaults (224 px)
            self.feature_extractor = CLIPImageProcessor()
        self.image_encoder = enc.to(device=param.device).eval().requires_grad_(False)

    def _load_identitynet(self, src: IPAdapterSource, profile_name: str, download: bool) -> None:
        """InstantID: the IdentityNet ControlNet (`ControlNetModel/` beside `ip-adapter.bin`)."""
        from diffusers import ControlNetModel

        name = src.controlnet or "ControlNetModel"
        param = next(self.pipe.unet.parameters())
        try:
            if src.local_path:
                folder = src.local_path if os.path.isdir(src.local_path) else os.path.dirname(src.local_path)
                net = ControlNetModel.from_pretrained(os.path.join(folder, name), dtype=param.dtype)
            elif os.path.isdir(name):
                net = ControlNetModel.from_pretrained(name, dtype=param.dtype)
            else:
                net = ControlNetModel.from_pretrained(src.repo_id, subfolder=name, dtype=param.dtype,
                                                      local_files_only=not download)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"profile {profile_name!r}: could not load the InstantID IdentityNet {name!r}: "
                               f"download it with `huggingface-cli download {src.repo_id or 'InstantX/InstantID'} "
                               f"--include '{name}/*'` (or set local_path). ({type(exc).__name__}: {exc})",
                               param="model") from exc
        from diffusers.models.attention_processor import AttnProcessor2_0

        net.set_attn_processor(AttnProcessor2_0())
        self.identitynet = IdentityNet(net.to(device=param.device).eval().requires_grad_(False))

    # ---- inputs -------------------------------------------------------------------------
    def tokens(self, per_image: Sequence[np.ndarray], do_cfg: bool,
               clip_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Identity tokens `[B (x2 under CFG), F, T, D]` for one call: per_image[i] is (512,) or
        (F, 512) for image i; the unconditional half is the projection of zero identities.
        Plus v2 also takes `clip_embeds` `[B (x2), F, S, H]` (see `clip_embeds`)."""
        if self.method == "faceid-plus-v2" and clip_embeds is None:
            raise RequestValidationError("faceid-plus-v2 needs CLIP embeddings of the face crops", param="photos")
        rows = [np.asarray(e, dtype=np.float32).reshape(-1, FACEID_EMBED_DIM) for e in per_image]
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError("every image in one call needs the same number of faces")
        param = next(self.projection.parameters())
        faces = torch.from_numpy(np.stack(rows)).to(device=param.device, dtype=param.dtype)  # [B, F, 512]
        if do_cfg:
            faces = torch.cat([torch.zeros_like(faces), faces])
        flat = faces.reshape(-1, FACEID_EMBED_DIM)
        if self.method == "instantid":
            tokens = self.projection(flat[:, None, :])  # Resampler over one embedding token
        elif self.method == "faceid-plus-v2":
            clip = clip_embeds.to(device=param.device, dtype=param.dtype)
            self.projection.clip_embeds = clip.reshape(-1, 1, *clip.shape[2:])  # [B·F, 1, S, H]
            try:
                tokens = self.projection(flat)
            finally:
                self.projection.clip_embeds = None
        else:
            tokens = self.projection(flat)  # [B·F, T, D]
        return tokens.reshape(faces.shape[0], faces.shape[1], *tokens.shape[1:])

    def weights(self, strengths: Sequence[float], do_cfg: bool) -> dict[str, torch.Tensor]:
        """Per-image identity scale and FaceID LoRA weight, `[B (x2 under CFG), 1, 1]` tensors.
        The LoRA was trained with the adapter, so it follows the strength (capped at 1): at
        strength 0 both add exactly nothing and the image is the plain pipeline's."""
        param = next(self.projection.parameters())
        scale = torch.tensor([float(s) for s in strengths], device=param.device, dtype=param.dtype)
        lora = torch.tensor([self.lora_scale * min(1.0, float(s)) for s in strengths], device=param.device,
                            dtype=param.dtype)
        if do_cfg:
            scale, lora = torch.cat([scale, scale]), torch.cat([lora, lora])
        return {"face_scale": scale[:, None, None], "lora_weight": lora[:, None, None]}

    def control_weights(self, strengths: Sequence[float], do_cfg: bool) -> torch.Tensor:
        """InstantID: per-image IdentityNet residual scale (`controlnet_scale` × strength, capped
        at 1 like the LoRA), `[B (x2)]`; 0 adds exactly nothing."""
        param = next(self.projection.parameters())
        w = torch.tensor([self.control_scale * min(1.0, float(s)) for s in strengths], device=param.device,
                         dtype=param.dtype)
        return torch.cat([w, w]) if do_cfg else w

    @torch.no_grad()
    def clip_embeds(self, per_image_crops: Sequence[Sequence[Sequence[Any] | None]], do_cfg: bool) -> torch.Tensor:
        """Plus v2: penultimate CLIP hidden states of each face's aligned crops, averaged over
        that face's reference photos → `[B (x2 under CFG), F, S, H]`. A face slot without crops
        (None) and the unconditional half get the encoder's output for a black image, as
        diffusers' `encode_image` makes its negative."""
        enc, param = self.image_encoder, next(self.image_encoder.parameters())

        def hidden(pixels: torch.Tensor) -> torch.Tensor:
            return enc(pixels.to(device=param.device, dtype=param.dtype), output_hidden_states=True).hidden_states[-2]

        cache: dict[int, torch.Tensor] = {}
        blank = None
        rows = []
        for faces in per_image_crops:
            row = []
            for crops in faces:
                if crops is None or len(crops) == 0:
                    if blank is None:
                        px = self.feature_extractor(images=[np.zeros((8, 8, 3), np.uint8)], return_tensors="pt").pixel_values
                        blank = hidden(torch.zeros_like(px))[0]
                    row.append(blank)
                    continue
                if id(crops) not in cache:
                    px = self.feature_extractor(images=list(crops), return_tensors="pt").pixel_values
                    cache[id(crops)] = hidden(px).mean(0)
                row.append(cache[id(crops)])
            rows.append(torch.stack(row))
        out = torch.stack(rows)  # [B, F, S, H]
        if do_cfg:
            if blank is None:
                px = self.feature_extractor(images=[np.zeros((8, 8, 3), np.uint8)], return_tensors="pt").pixel_values
                blank = hidden(torch.zeros_like(px))[0]
            out = torch.cat([blank.expand_as(out), out])
        return out

    def unload(self) -> None:
        """Remove this method's weights from the processors and drop its extra models."""
        if not self.loaded:
            return
        detach_identity_weights(self.pipe.unet, self.method)
        self.projection = self.image_encoder = self.feature_extractor = self.identitynet = None
        self.loaded = False
