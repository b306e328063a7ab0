"""IP-Adapter FaceID on a loaded pipeline: load once per model, switch on per call.

Why a switch and not load/unload per request: loading a real FaceID checkpoint installs new
attention processors, an image projection and a LoRA (through peft), which takes seconds. We
load it once, keep both sets of attention processors, and swap them inside `active()`; outside
it the UNet runs with its original processors, no image projection and the FaceID LoRA
disabled, so plain generate requests on the same model produce exactly the plain pipeline's
pixels.

Embedding layout diffusers 0.42 expects for FaceID (read from
`StableDiffusionPipeline.prepare_ip_adapter_image_embeds` and `MultiIPAdapterImageProjection`):
one tensor per loaded adapter, shape `[2*B, n_faces, 512]` under classifier-free guidance with
the negative (zero) half first, `[B, n_faces, 512]` without CFG. Percify uses n_faces = 1.

Sources (models.yaml `ip_adapter`):
- `tiny: true`: seeded random weights of the real key layout, built in-process for the UNet at
  hand (tiny-sd15 and tiny-sdxl), including a small FaceID LoRA so the peft path is exercised.
- `faceid`: `h94/IP-Adapter-FaceID` `ip-adapter-faceid_sd15.bin` / `ip-adapter-faceid_sdxl.bin`
  (hub id or a local directory). Needs peft: the checkpoints carry LoRA keys.
- `faceid-plusv2`: `ip-adapter-faceid-plusv2_sd15.bin` / `_sdxl.bin` plus a CLIP image encoder
  (`image_encoder`, e.g. `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`); each call also needs CLIP
  hidden states of the aligned face crops (`clip_embeds`), set on the projection layer as the
  diffusers docs show. This path follows the docs but is not exercised offline.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from .config import IPAdapterSource
from .errors import ProfileError, RequestValidationError

log = logging.getLogger(__name__)

FACEID_EMBED_DIM = 512
FACEID_TOKENS = 4
TINY_ADAPTER_SEED = 1234
TINY_LORA_RANK = 4
VARIANTS = ("faceid", "faceid-plusv2")


# ---------------------------------------------------------------------------------------
# tiny weights

def _cross_attention_processor_names(unet) -> list[str]:
    return list(unet.attn_processors.keys())


def _hidden_size(unet, name: str) -> int:
    """Channel width of the block a processor lives in (as diffusers' converter computes it)."""
    cfg = unet.config
    if name.startswith("mid_block"):
        return cfg.block_out_channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
    return cfg.block_out_channels[int(name[len("down_blocks.")])]


def tiny_faceid_state_dict(unet, *, seed: int = TINY_ADAPTER_SEED, lora_rank: int = TINY_LORA_RANK,
                           with_lora: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Random FaceID weights in the original checkpoint layout for `unet`.

    image_proj: proj.0 (512→1024), proj.2 (1024→4·cross_attention_dim), norm. ip_adapter: for
    processor i (diffusers enumerates attn1, attn2, ...): `{i}.to_{q,k,v,out}_lora.{down,up}`
    and, on cross-attention processors (odd i), `{i}.to_k_ip` / `{i}.to_v_ip`. Seeded, so every
    machine builds the same adapter."""
    gen = torch.Generator().manual_seed(seed)
    cad = unet.config.cross_attention_dim
    if isinstance(cad, (list, tuple)):
        cad = cad[0]

    def rand(*shape, std=None):
        std = std if std is not None else 1.0 / np.sqrt(shape[-1])
        return torch.randn(*shape, generator=gen) * std

    image_proj = {
        "proj.0.weight": rand(1024, FACEID_EMBED_DIM, std=1.0),  # normed inputs (|x|=1): keep activations O(1)
        "proj.0.bias": rand(1024, std=0.1),
        "proj.2.weight": rand(FACEID_TOKENS * cad, 1024),
        "proj.2.bias": rand(FACEID_TOKENS * cad, std=0.1),
        "norm.weight": torch.ones(cad),
        "norm.bias": torch.zeros(cad),
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    for i, name in enumerate(_cross_attention_processor_names(unet)):
        hidden = _hidden_size(unet, name)
        cross = name.endswith("attn2.processor")
        kv_in = cad if cross else hidden
        if with_lora:
            for proj, in_dim in (("q", hidden), ("k", kv_in), ("v", kv_in), ("out", hidden)):
                ip_adapter[f"{i}.to_{proj}_lora.down.weight"] = rand(lora_rank, in_dim)
                ip_adapter[f"{i}.to_{proj}_lora.up.weight"] = rand(hidden, lora_rank, std=0.02)
        if cross:
            ip_adapter[f"{i}.to_k_ip.weight"] = rand(hidden, cad)
            ip_adapter[f"{i}.to_v_ip.weight"] = rand(hidden, cad)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


# ---------------------------------------------------------------------------------------
# loading real checkpoints

@contextlib.contextmanager
def _quiet_diffusers():
    """load_ip_adapter logs expected noise (no image encoder, no text-encoder LoRA keys)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def _load_args(src: IPAdapterSource, profile_name: str) -> tuple[Any, dict]:
    """(pretrained_model_name_or_path, kwargs) for `pipe.load_ip_adapter`."""
    if not src.weight_name:
        raise ProfileError(f"profile {profile_name!r}: ip_adapter.weight_name is required (e.g. "
                           f"ip-adapter-faceid_sd15.bin)", param="model")
    kwargs = {"subfolder": src.subfolder, "weight_name": src.weight_name, "image_encoder_folder": None}
    if src.local_path:
        path = src.local_path
        if os.path.isfile(path):  # a path straight to the weight file
            path = os.path.dirname(path)
        if not os.path.isfile(os.path.join(path, src.subfolder or "", src.weight_name)):
            raise ProfileError(
                f"profile {profile_name!r}: IP-Adapter weights {src.weight_name!r} not found under "
                f"{src.local_path!r}. Download them with `huggingface-cli download {src.repo_id or 'h94/IP-Adapter-FaceID'} "
                f"{src.weight_name} --local-dir {src.local_path}`", param="model")
        return path, kwargs
    if not src.repo_id:
        raise ProfileError(f"profile {profile_name!r}: ip_adapter needs repo_id or local_path (or tiny: true)",
                           param="model")
    return src.repo_id, kwargs


def _accept_per_image_embeds(pipe) -> None:
    """Let `ip_adapter_image_embeds` carry one row per image of the batch.

    diffusers 0.42's pipelines treat the embeds as one set shared by the whole batch and repeat
    them `batch_size` times (`prepare_ip_adapter_image_embeds(..., batch_size *
    num_images_per_prompt, ...)`). Per-image rows would be repeated too, and the attention
    processor would then fold the extra rows into the token axis, so every image would attend
    to every identity of the batch. When the leading dimension already equals the batch (×2
    under CFG) we pass the rows through unchanged; otherwise diffusers' own method runs. The
    override is an instance attribute, removed when the adapter is switched off."""
    original = type(pipe).prepare_ip_adapter_image_embeds.__get__(pipe)

    def prepare(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance):
        if ip_adapter_image_embeds is not None:
            rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
            if all(e.shape[0] == rows for e in ip_adapter_image_embeds):
                return [e.to(device=device) for e in ip_adapter_image_embeds]
        return original(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt,
                        do_classifier_free_guidance)

    pipe.__dict__["prepare_ip_adapter_image_embeds"] = prepare


class IdentityAdapter:
    """A FaceID adapter loaded into one pipeline; inactive unless inside `active()`.

    Shared by percify (one face per image) and cast (several faces per image with
    `ip_adapter_masks`): both build their embeds with `embeds()` and run the pipeline inside
    `with adapter.active(strength):`."""

    def __init__(self, pipe, src: IPAdapterSource, profile_name: str = "?"):
        # Check the configuration before touching the pipeline.
        if src.variant not in VARIANTS:
            raise ProfileError(f"profile {profile_name!r}: ip_adapter.variant must be one of {VARIANTS}",
                               param="model")
        if src.tiny and src.variant != "faceid":
            raise ProfileError(f"profile {profile_name!r}: tiny IP-Adapter weights exist only for variant faceid",
                               param="model")
        if not src.tiny:
            if not _peft_available():
                raise ProfileError(f"profile {profile_name!r}: IP-Adapter FaceID checkpoints carry LoRA weights; "
                                   f"install peft (`pip install peft`)", param="model")
            source, kwargs = _load_args(src, profile_name)
            if src.variant == "faceid-plusv2" and not src.image_encoder:
                raise ProfileError(f"profile {profile_name!r}: faceid-plusv2 needs ip_adapter.image_encoder "
                                   f"(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", param="model")
        self.pipe = pipe
        self.source = src
        self.variant = src.variant
        self.lora_scale = float(src.lora_scale)
        self.loaded = False
        unet = pipe.unet
        from .speed import unfuse_for_adapters

        unfuse_for_adapters(pipe)  # IP processors need separate q/k/v projections
        self._plain_procs = dict(unet.attn_processors)
        self._plain_hid_proj = unet.encoder_hid_proj
        self._plain_hid_type = unet.config.encoder_hid_dim_type
        before = set(getattr(unet, "peft_config", {}) or {})
        if src.tiny:
            with _quiet_diffusers():
                pipe.load_ip_adapter(tiny_faceid_state_dict(unet), subfolder=None, weight_name=None,
                                     image_encoder_folder=None)
        else:
            try:
                with _quiet_diffusers():
                    pipe.load_ip_adapter(source, **kwargs)
            except (OSError, ValueError) as exc:
                raise ProfileError(
                    f"profile {profile_name!r}: could not load IP-Adapter {src.weight_name!r} from {source!r}: "
                    f"download it with `huggingface-cli download {src.repo_id or 'h94/IP-Adapter-FaceID'} "
                    f"{src.weight_name}` or set ip_adapter.local_path. ({type(exc).__name__}: {exc})",
                    param="model") from exc
        self.lora_names = sorted(set(getattr(unet, "peft_config", {}) or {}) - before)
        self._ip_procs = dict(unet.attn_processors)
        self._ip_hid_proj = unet.encoder_hid_proj
        self.projection = unet.encoder_hid_proj.image_projection_layers[0]
        if src.variant == "faceid-plusv2":
            self._load_image_encoder(src, profile_name)
        self._deactivate()
        self.loaded = True
        log.info("IP-Adapter %s loaded (%s), LoRA adapters %s", self.variant,
                 "tiny" if src.tiny else (src.local_path or src.repo_id), self.lora_names)

    def _load_image_encoder(self, src: IPAdapterSource, profile_name: str) -> None:
        """Plus v2: CLIP ViT-H image encoder for the face crop (diffusers docs, IP-Adapter FaceID Plus)."""
        from transformers import CLIPVisionModelWithProjection

        try:
            enc = CLIPVisionModelWithProjection.from_pretrained(src.image_encoder, dtype=self.pipe.unet.dtype)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"profile {profile_name!r}: could not load image encoder {src.image_encoder!r}: "
                               f"download it with `huggingface-cli download {src.image_encoder}`. ({exc})",
                               param="model") from exc
        self.pipe.register_modules(image_encoder=enc.to(self.pipe.device))
        self.projection.shortcut = True  # the "v2" in Plus v2
        self.projection.shortcut_scale = 1.0

    # ---- switching ----------------------------------------------------------------------
    def _set_procs(self, procs: dict) -> None:
        self.pipe.unet.set_attn_processor(dict(procs))  # set_attn_processor pops from the dict it gets

    def _deactivate(self) -> None:
        unet = self.pipe.unet
        self._set_procs(self._plain_procs)
        unet.encoder_hid_proj = self._plain_hid_proj
        unet.config.encoder_hid_dim_type = self._plain_hid_type
        if self.lora_names:
            others = [n for n in unet.peft_config if n not in self.lora_names]
            if others:
                unet.set_adapters(others)
            else:
                unet.disable_adapters()

    def _activate(self, strength: float) -> None:
        unet = self.pipe.unet
        self._set_procs(self._ip_procs)
        unet.encoder_hid_proj = self._ip_hid_proj
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.pipe.set_ip_adapter_scale(float(strength))
        if self.lora_names:
            unet.enable_adapters()
            # The FaceID LoRA was trained with the adapter; it follows the identity strength
            # (capped at 1) so that strength → 0 fades both out together.
            w = self.lora_scale * min(1.0, float(strength))
            unet.set_adapters(self.lora_names, [w] * len(self.lora_names))

    @contextlib.contextmanager
    def active(self, strength: float, clip_embeds: torch.Tensor | None = None, pipe=None):
        """Run pipeline calls with identity conditioning at `strength` (IP-Adapter scale).

        `pipe`: the pipeline that will be called, when it is not the one the adapter was loaded
        into (e.g. an img2img pipeline sharing the UNet)."""
        if self.variant == "faceid-plusv2" and clip_embeds is None:
            raise RequestValidationError("faceid-plusv2 needs CLIP embeddings of the face crops", param="photos")
        if not self.loaded:
            raise RuntimeError("this IP-Adapter was unloaded; get a fresh one with identity_adapter(model)")
        pipes = [self.pipe] + ([pipe] if pipe is not None and pipe is not self.pipe else [])
        try:
            self._activate(strength)
            for p in pipes:
                _accept_per_image_embeds(p)
            if clip_embeds is not None:
                self.projection.clip_embeds = clip_embeds.to(device=self.pipe.device, dtype=self.pipe.unet.dtype)
            yield self
        finally:
            if clip_embeds is not None:
                self.projection.clip_embeds = None
            for p in pipes:
                p.__dict__.pop("prepare_ip_adapter_image_embeds", None)
            self._deactivate()

    # ---- inputs -------------------------------------------------------------------------
    def embeds(self, per_image: Sequence[np.ndarray], do_cfg: bool) -> list[torch.Tensor]:
        """`ip_adapter_image_embeds` for one call: per_image[i] is (512,) or (n_faces, 512) for
        image i of the batch; zeros are the unconditional half under CFG."""
        rows = [np.asarray(e, dtype=np.float32).reshape(-1, FACEID_EMBED_DIM) for e in per_image]
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError("every image in one call needs the same number of faces")
        faces = torch.from_numpy(np.stack(rows))  # [B, n_faces, 512]
        if do_cfg:
            faces = torch.cat([torch.zeros_like(faces), faces])
        return [faces.to(device=self.pipe.device, dtype=self.pipe.unet.dtype)]

    def clip_embeds(self, per_image_crops: Sequence[Sequence[Any]], do_cfg: bool) -> torch.Tensor:
        """Plus v2: CLIP hidden states of each image's face crops (224 px, aligned), averaged over
        an image's reference photos → `[2B or B, 1, 257, hidden]`."""
        pos, neg = [], []
        for crops in per_image_crops:
            emb, uncond = self.pipe.encode_image(list(crops), self.pipe.device, 1, output_hidden_states=True)
            pos.append(emb.mean(0, keepdim=True))
            neg.append(uncond.mean(0, keepdim=True))
        out = torch.cat(neg + pos) if do_cfg else torch.cat(pos)
        return out[:, None]

    def unload(self) -> None:
        """Remove the adapter for good: diffusers 0.42's `unload_ip_adapter()` leaves the FaceID
        LoRA in the UNet, so delete it too."""
        if not self.loaded:
            return
        self._activate(0.0)  # unload_ip_adapter expects the IP processors in place
        self.pipe.unload_ip_adapter()
        self._set_procs(self._plain_procs)
        if self.lora_names:
            self.pipe.unet.delete_adapters(self.lora_names)
        from .regional import forget_processors

        forget_processors(self.pipe.unet)  # cast's cached processors reference the IP processors
        self.lora_names = []
        self.loaded = False


def identity_adapter(model) -> IdentityAdapter:
    """The model's FaceID adapter, loaded on first use and kept in `model.state`."""
    adapter = model.state.get("ip_adapter")
    if adapter is None or not adapter.loaded:
        src = model.profile.ip_adapter
        if src is None:
            raise RequestValidationError(
                f"model {model.profile.name!r} has no IP-Adapter configured (ip_adapter in models.yaml), so it "
                f"cannot do identity-preserving generation", param="model")
        adapter = IdentityAdapter(model.pipe, src, model.profile.name)
        model.state["ip_adapter"] = adapter
        model.applied["ip_adapter"] = f"{src.variant}{' (tiny)' if src.tiny else ''}"
        if model.applied.get("fuse_qkv"):
            model.applied["fuse_qkv"] = "off (unfused for the IP-Adapter)"
    return adapter


def release_identity_adapter(model) -> bool:
    """Unload the model's FaceID adapter (and its LoRA) to free memory; the next identity
    request loads it again. Returns whether one was loaded."""
    adapter = model.state.pop("ip_adapter", None)
    model.applied.pop("ip_adapter", None)
    if adapter is None or not adapter.loaded:
        return False
    adapter.unload()
    return True
