"""Seeded random identity-method weights in the released files' layouts, for tests and offline
runs (`tiny: true` in models.yaml). FaceID's are built in memory; Plus v2's and InstantID's are
written to the engine cache and loaded back through the real loading code (checkpoints.py)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from ...config import cache_dir
from ...identity_methods import METHODS
from ...io import build_dir_atomically
from ...requests.common import EMBEDDING_DIM as FACEID_EMBED_DIM

FACEID_TOKENS = METHODS["faceid"].tokens_per_face
INSTANTID_TOKENS = METHODS["instantid"].tokens_per_face
TINY_ADAPTER_SEED = 1234
TINY_LORA_RANK = 4
TINY_CLIP_IMAGE_SIZE = 32  # the tiny CLIP vision model's input (the real ViT-H: 224)
TINY_WEIGHTS_VERSION = "1"  # bump when the tiny plus-v2 / instantid writers change


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


def write_faceid_checkpoint(unet, path: str | os.PathLike, **kwargs) -> str:
    """Write `tiny_faceid_state_dict(unet, **kwargs)` as an h94-format `.bin` file."""
    torch.save(tiny_faceid_state_dict(unet, **kwargs), path)
    return str(path)


def _perceiver_layers(rand, prefix: str, dim: int, inner: int, depth: int, ff_mult: int = 4) -> dict:
    """Original (tencent-ailab IP-Adapter / InstantID) keys of `depth` PerceiverAttention +
    FeedForward layers: `{prefix}layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}`, `.1.{0,1,3}`."""
    out = {}
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{p}0.{norm}.weight"], out[f"{p}0.{norm}.bias"] = torch.ones(dim), torch.zeros(dim)
        out[f"{p}0.to_q.weight"] = rand(inner, dim)
        out[f"{p}0.to_kv.weight"] = rand(2 * inner, dim)
        out[f"{p}0.to_out.weight"] = rand(dim, inner)
        out[f"{p}1.0.weight"], out[f"{p}1.0.bias"] = torch.ones(dim), torch.zeros(dim)
        out[f"{p}1.1.weight"] = rand(dim * ff_mult, dim)
        out[f"{p}1.3.weight"] = rand(dim, dim * ff_mult)
    return out


PERCEIVER_DEPTH = 4  # diffusers' converters build 4 layers (the released Plus v2 and InstantID files have 4)
PERCEIVER_DIM_HEAD = 64  # diffusers' converters derive heads as to_q rows // 64


def _cross_dim(unet) -> int:
    cad = unet.config.cross_attention_dim
    return cad[0] if isinstance(cad, (list, tuple)) else cad


def tiny_faceid_plus_state_dict(unet, clip_hidden: int, *, seed: int = TINY_ADAPTER_SEED,
                                lora_rank: int = TINY_LORA_RANK) -> dict[str, dict[str, torch.Tensor]]:
    """Random FaceID Plus v2 weights in the h94 file layout: FaceID's image_proj (`proj.*`,
    `norm.*`) plus `perceiver_resampler.*` (FacePerceiverResampler: proj_in clip_hidden→dim,
    4 perceiver layers, proj_out, norm_out; dim = cross_attention_dim) and the same per-layer
    ip_adapter keys (LoRA + to_k_ip/to_v_ip) as plain FaceID."""
    state = tiny_faceid_state_dict(unet, seed=seed, lora_rank=lora_rank)
    gen = torch.Generator().manual_seed(seed + 1)
    dim = _cross_dim(unet)

    def rand(*shape, std=None):
        return torch.randn(*shape, generator=gen) * (std if std is not None else 1.0 / np.sqrt(shape[-1]))

    inner = max(1, dim // PERCEIVER_DIM_HEAD) * PERCEIVER_DIM_HEAD
    pr = {"perceiver_resampler.proj_in.weight": rand(dim, clip_hidden),
          "perceiver_resampler.proj_in.bias": rand(dim, std=0.02),
          "perceiver_resampler.proj_out.weight": rand(dim, dim),
          "perceiver_resampler.proj_out.bias": rand(dim, std=0.02),
          "perceiver_resampler.norm_out.weight": torch.ones(dim),
          "perceiver_resampler.norm_out.bias": torch.zeros(dim)}
    pr.update(_perceiver_layers(rand, "perceiver_resampler.", dim, inner, PERCEIVER_DEPTH))
    state["image_proj"].update(pr)
    return state


def tiny_instantid_state_dict(unet, *, seed: int = TINY_ADAPTER_SEED) -> dict[str, dict[str, torch.Tensor]]:
    """Random InstantID IP-Adapter weights in `ip-adapter.bin`'s layout: image_proj is the
    Resampler (`latents` [1, 16, dim], proj_in 512→dim, 4 perceiver layers, proj_out dim→
    cross_attention_dim, norm_out; the released file: dim 1280, heads 20, output 2048),
    ip_adapter `{i}.to_k_ip` / `{i}.to_v_ip` on cross-attention processors, no LoRA."""
    gen = torch.Generator().manual_seed(seed + 2)
    cad = _cross_dim(unet)

    def rand(*shape, std=None):
        return torch.randn(*shape, generator=gen) * (std if std is not None else 1.0 / np.sqrt(shape[-1]))

    dim = max(PERCEIVER_DIM_HEAD, cad)
    inner = PERCEIVER_DIM_HEAD * max(1, dim // PERCEIVER_DIM_HEAD)
    image_proj = {"latents": rand(1, INSTANTID_TOKENS, dim, std=dim ** -0.5),
                  "proj_in.weight": rand(dim, FACEID_EMBED_DIM, std=1.0), "proj_in.bias": rand(dim, std=0.02),
                  "proj_out.weight": rand(cad, dim), "proj_out.bias": rand(cad, std=0.02),
                  "norm_out.weight": torch.ones(cad), "norm_out.bias": torch.zeros(cad)}
    image_proj.update(_perceiver_layers(rand, "", dim, inner, PERCEIVER_DEPTH))
    ip_adapter = {}
    for i, name in enumerate(_cross_attention_processor_names(unet)):
        if name.endswith("attn2.processor"):
            hidden = _hidden_size(unet, name)
            ip_adapter[f"{i}.to_k_ip.weight"] = rand(hidden, cad)
            ip_adapter[f"{i}.to_v_ip.weight"] = rand(hidden, cad)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_tiny_clip_encoder(folder: str | os.PathLike, *, seed: int = TINY_ADAPTER_SEED) -> str:
    """A tiny CLIPVisionModelWithProjection (built from config, seeded) + its CLIPImageProcessor,
    saved like `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (config.json, weights,
    preprocessor_config.json)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=32, hidden_act="gelu")
    CLIPVisionModelWithProjection(cfg).save_pretrained(str(folder))
    side = TINY_CLIP_IMAGE_SIZE
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(str(folder))
    return str(folder)


def tiny_identitynet(unet, *, seed: int = TINY_ADAPTER_SEED):
    """A ControlNetModel from the UNet's config (as InstantID's IdentityNet is from SDXL's),
    with seeded random zero-convolutions so its residuals are not all zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 3)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                    load_weights_from_unet=False)
    # The encoder half starts as the UNet's (as IdentityNet was initialised from SDXL); the
    # engine's processors carry identity weights and fused projections that are not the UNet's own.
    own = net.state_dict()
    copied = {k: v for k, v in unet.state_dict().items()
              if k in own and own[k].shape == v.shape and ".processor." not in k}
    net.load_state_dict(copied, strict=False)
    gen = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for conv in list(net.controlnet_down_blocks) + [net.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    return net


def write_faceid_plus_checkpoint(unet, folder: str | os.PathLike) -> dict:
    """Tiny FaceID Plus v2 files: `image_encoder/` (tiny CLIP vision) and
    `ip-adapter-faceid-plusv2_tiny.bin` (h94 layout). Returns the IPAdapterSource fields."""
    folder = os.fspath(folder)
    enc = write_tiny_clip_encoder(os.path.join(folder, "image_encoder"))
    from transformers import CLIPVisionConfig

    hidden = CLIPVisionConfig.from_pretrained(enc).hidden_size
    torch.save(tiny_faceid_plus_state_dict(unet, hidden), os.path.join(folder, "ip-adapter-faceid-plusv2_tiny.bin"))
    return {"local_path": folder, "weight_name": "ip-adapter-faceid-plusv2_tiny.bin",
            "image_encoder": os.path.join(folder, "image_encoder")}


def write_instantid_checkpoint(unet, folder: str | os.PathLike) -> dict:
    """Tiny InstantID files in the InstantX/InstantID repo layout: `ip-adapter.bin` and
    `ControlNetModel/` (config.json + diffusion_pytorch_model.safetensors)."""
    folder = os.fspath(folder)
    torch.save(tiny_instantid_state_dict(unet), os.path.join(folder, "ip-adapter.bin"))
    tiny_identitynet(unet).save_pretrained(os.path.join(folder, "ControlNetModel"), safe_serialization=True)
    return {"local_path": folder, "weight_name": "ip-adapter.bin", "controlnet": "ControlNetModel"}


_TINY_WRITERS = {"faceid-plus-v2": write_faceid_plus_checkpoint, "instantid": write_instantid_checkpoint}


def tiny_method_files(method: str, unet) -> dict:
    """The tiny files of `method` for this UNet under the engine cache (written once; atomic
    rename, so concurrent processes never read half a checkpoint). Returns source fields."""
    key = hashlib.sha256(f"{method}|{TINY_WEIGHTS_VERSION}|{json.dumps(dict(unet.config), sort_keys=True, default=str)}"
                         .encode()).hexdigest()[:12]
    target = cache_dir() / "tiny" / f"{method}-{key}"
    done = target / ".complete"
    if not done.exists():
        def build(tmp) -> None:
            with torch.random.fork_rng():  # the writers seed torch; leave the process's RNG as it was
                _TINY_WRITERS[method](unet, str(tmp))
            (tmp / ".complete").touch()

        build_dir_atomically(target, build)
    fields = {"faceid-plus-v2": {"weight_name": "ip-adapter-faceid-plusv2_tiny.bin",
                                 "image_encoder": str(target / "image_encoder")},
              "instantid": {"weight_name": "ip-adapter.bin", "controlnet": "ControlNetModel"}}[method]
    return {"local_path": str(target), **fields}
