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

import contextlib
import logging
import math
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
VARIANTS = ("faceid", "faceid-plus-v2", "instantid")
TINY_CLIP_IMAGE_SIZE = 32  # the tiny CLIP vision model's input (the real ViT-H: 224)
TINY_WEIGHTS_VERSION = "1"  # bump when the tiny plus-v2 / instantid writers change
INSTANTID_TOKENS = 16


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


@contextlib.contextmanager
def _quiet_diffusers():
    """The projection converter logs expected noise (low_cpu_mem_usage without accelerate hooks)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


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
    import hashlib
    import json

    from .config import cache_dir
    from .io import build_dir_atomically

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


# ---------------------------------------------------------------------------------------
# loading checkpoints

def _checkpoint_path(src: IPAdapterSource, profile_name: str) -> str:
    """The weight file on local disk (downloading from the hub when `repo_id` is used)."""
    if not src.weight_name:
        raise ProfileError(f"profile {profile_name!r}: ip_adapter.weight_name is required (e.g. "
                           f"ip-adapter-faceid_sd15.bin)", param="model")
    hint = (f"Download it with `huggingface-cli download {src.repo_id or 'h94/IP-Adapter-FaceID'} "
            f"{src.weight_name}{' --local-dir ' + src.local_path if src.local_path else ''}`")
    if src.local_path:
        folder = os.path.dirname(src.local_path) if os.path.isfile(src.local_path) else src.local_path
        path = os.path.join(folder, src.subfolder or "", src.weight_name)
        if not os.path.isfile(path):
            raise ProfileError(f"profile {profile_name!r}: IP-Adapter weights {src.weight_name!r} not found under "
                               f"{src.local_path!r}. {hint}", param="model")
        return path
    if not src.repo_id:
        raise ProfileError(f"profile {profile_name!r}: ip_adapter needs repo_id or local_path (or tiny: true)",
                           param="model")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(src.repo_id, src.weight_name, subfolder=src.subfolder)
    except Exception as exc:  # noqa: BLE001 - offline, missing file, auth: all mean "get the file first"
        raise ProfileError(f"profile {profile_name!r}: could not fetch IP-Adapter {src.weight_name!r} from "
                           f"{src.repo_id!r}: {hint}, or set ip_adapter.local_path. ({type(exc).__name__}: {exc})",
                           param="model") from exc


def read_checkpoint(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": ..., "ip_adapter": ...}` from an h94 `.bin` or a `.safetensors` file
    (flat keys prefixed `image_proj.` / `ip_adapter.`)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(path)
        out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            if group in out:
                out[group][rest] = value
        return out
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise ValueError("not an IP-Adapter checkpoint (expected 'image_proj' and 'ip_adapter')")
    return state


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    return layer


def attach_identity_weights(unet, ip_state: dict[str, torch.Tensor], profile_name: str = "?",
                            method: str = "faceid") -> int:
    """Give each AvatarAttnProcessor its layer's weights of one identity method (under
    `identities[method]`); returns the LoRA rank (0: none). Fails, naming the first missing key,
    when the checkpoint does not match the UNet."""
    from .attention import IdentityWeights, LoRAProjection, processors

    procs = processors(unet)
    if len(procs) != len(unet.attn_processors):
        raise RuntimeError("install_processors must run before an identity adapter is attached")
    rank = 0
    built = {}
    for i, (name, proc) in enumerate(procs.items()):
        lora = None
        if f"{i}.to_q_lora.down.weight" in ip_state:
            lora = {}
            for proj in ("q", "k", "v", "out"):
                down, up = ip_state[f"{i}.to_{proj}_lora.down.weight"], ip_state[f"{i}.to_{proj}_lora.up.weight"]
                layer = LoRAProjection(down.shape[1], up.shape[0], down.shape[0])
                layer.down.weight = torch.nn.Parameter(down.detach().clone(), requires_grad=False)
                layer.up.weight = torch.nn.Parameter(up.detach().clone(), requires_grad=False)
                lora[proj] = layer
            rank = down.shape[0]
        k_ip = v_ip = None
        if proc.cross:
            key = f"{i}.to_k_ip.weight"
            if key not in ip_state:
                raise ProfileError(f"profile {profile_name!r}: the {method} checkpoint does not fit this UNet "
                                   f"(no {key!r} for {name})", param="model")
            k_ip, v_ip = _linear(ip_state[key]), _linear(ip_state[f"{i}.to_v_ip.weight"])
        built[name] = IdentityWeights(lora, k_ip, v_ip)
    param = next(unet.parameters())
    for name, proc in procs.items():
        proc.identities[method] = built[name].to(device=param.device, dtype=param.dtype)
    return rank


def detach_identity_weights(unet, method: str | None = None) -> None:
    """Remove one method's weights (None: every method's) from the processors."""
    from .attention import processors

    for proc in processors(unet).values():
        for name in [method] if method else list(proc.identities.keys()):
            if name in proc.identities:
                del proc.identities[name]


# ---------------------------------------------------------------------------------------
# InstantID: face keypoints and the IdentityNet ControlNet

KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def draw_kps(width: int, height: int, faces_kps: Sequence[np.ndarray]) -> np.ndarray:
    """InstantID's `draw_kps`: on black, the four limbs eye/eye/mouth/mouth → nose as filled
    ellipses (60 % brightness) and the five keypoints as discs, in its colours. InstantID draws
    at ~1024 px with limb half-width 4 and radius 10; both scale with the image's shorter side
    here (at 1024 px they are InstantID's). Several faces may be drawn (cast). HxWx3 uint8."""
    import cv2

    scale = min(width, height) / 1024.0
    stick, radius = max(1, int(round(4 * scale))), max(1, int(round(10 * scale)))
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    out = np.zeros((height, width, 3), np.float64)
    for kps in faces_kps:
        kps = np.asarray(kps, np.float64).reshape(5, 2)
        for a, b in limbs:
            x, y = kps[[a, b], 0], kps[[a, b], 1]
            length = float(np.hypot(x[0] - x[1], y[0] - y[1]))
            angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
            poly = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), stick), int(angle), 0, 360, 1)
            out = cv2.fillConvexPoly(out.copy(), poly, KPS_COLORS[a])
    out = (out * 0.6).astype(np.uint8)
    for kps in faces_kps:
        for i, (x, y) in enumerate(np.asarray(kps, np.float64).reshape(5, 2)):
            out = cv2.circle(out.copy(), (int(x), int(y)), radius, KPS_COLORS[i], -1)
    return out


def frontal_kps() -> np.ndarray:
    """A frontal face's keypoints (ArcFace's template), for identities without a photo."""
    from .faces.base import ARCFACE_TEMPLATE

    return ARCFACE_TEMPLATE.astype(np.float64)


def kps_in_frame(kps: np.ndarray | None, photo_size: tuple[int, int] | None, width: int, height: int) -> np.ndarray:
    """Percify: the reference face's keypoints carried into the output frame (the photo fitted
    into the frame, centred — InstantID's demo resizes the photo to the output likewise); a
    centred frontal face filling ~40 % of the shorter side when there is no photo."""
    if kps is None or photo_size is None:
        return kps_in_box(frontal_kps(), (0.0, 0.0, 1.0, 1.0), width, height, face_frac=0.4, top=0.3)
    pw, ph = photo_size
    s = min(width / pw, height / ph)
    off = np.array([(width - pw * s) / 2, (height - ph * s) / 2])
    return np.asarray(kps, np.float64).reshape(5, 2) * s + off


def kps_in_box(kps: np.ndarray | None, box, width: int, height: int, face_frac: float = 0.5,
               top: float = 0.25) -> np.ndarray:
    """Cast: a face's keypoints placed in a character's region (normalised box): the keypoint
    spread scaled to `face_frac` of the region's shorter side, centred horizontally with the
    keypoints' centre `top` of the way down the region (a head above a body)."""
    kps = frontal_kps() if kps is None else np.asarray(kps, np.float64).reshape(5, 2)
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    centre = kps.mean(0)
    spread = max(float(np.ptp(kps[:, 0])), float(np.ptp(kps[:, 1])), 1e-6)
    s = face_frac * min(x1 - x0, y1 - y0) / spread
    target = np.array([(x0 + x1) / 2, y0 + top * (y1 - y0)])
    return (kps - centre) * s + target


class IdentityNet:
    """InstantID's ControlNet for one pipeline: its residuals are added to the UNet call by a
    forward pre-hook that exists only inside `applied(...)`, so plain calls never see it."""

    def __init__(self, controlnet):
        self.controlnet = controlnet

    @contextlib.contextmanager
    def applied(self, unet, tokens: torch.Tensor, images: torch.Tensor, scale: torch.Tensor,
                masks: torch.Tensor | None = None, active: Sequence[bool] | None = None):
        """tokens [N, F, T, D] (N counts the CFG halves), images [N, F, 3, H, W] in 0..1, scale
        [N] per-image ControlNet weight, masks [N, F, H, W] pixel weights (cast: each face's
        residuals confined to its region) or None; `active[f]` False skips face f's ControlNet
        run (no image of the call has that face)."""
        import torch.nn.functional as F

        faces = tokens.shape[1]
        active = list(active) if active is not None else [True] * faces

        def pre_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            down_total, mid_total = None, None
            for f in range(faces):
                if not active[f]:
                    continue
                down, mid = self.controlnet(sample, t, encoder_hidden_states=tokens[:, f], controlnet_cond=images[:, f],
                                            conditioning_scale=1.0, guess_mode=False,
                                            added_cond_kwargs=kwargs.get("added_cond_kwargs"), return_dict=False)
                w = scale.to(sample.dtype)[:, None, None, None]

                def weigh(r, f=f):
                    if masks is None:
                        return r * w
                    m = F.interpolate(masks[:, f:f + 1].to(torch.float32), size=r.shape[-2:], mode="area")
                    return r * w * m.to(r.dtype)

                down, mid = [weigh(d) for d in down], weigh(mid)
                down_total = down if down_total is None else [a + b for a, b in zip(down_total, down)]
                mid_total = mid if mid_total is None else mid_total + mid
            if down_total is not None:
                kwargs = dict(kwargs)
                kwargs["down_block_additional_residuals"] = tuple(down_total)
                kwargs["mid_block_additional_residual"] = mid_total
            return args, kwargs

        handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def keypoint_images(per_image: Sequence[Sequence[np.ndarray | None]], width: int, height: int, device, dtype,
                    do_cfg: bool) -> torch.Tensor:
    """[N, F, 3, H, W] 0..1 control images: per image, per face slot, that face's keypoints
    drawn alone (None: a black image). The unconditional half repeats them (as the community
    pipeline does: the ControlNet sees the keypoints under both halves)."""
    rows = []
    for faces in per_image:
        rows.append(np.stack([draw_kps(width, height, [k]) if k is not None else np.zeros((height, width, 3), np.uint8)
                              for k in faces]))
    arr = torch.from_numpy(np.stack(rows)).permute(0, 1, 4, 2, 3).to(device=device, dtype=dtype) / 255.0
    return torch.cat([arr, arr]) if do_cfg else arr


# ---------------------------------------------------------------------------------------
# the adapter

class IdentityAdapter:
    """One identity method attached to one pipeline's UNet processors (under its method name).

    Shared by percify (one face per image) and cast (several faces per image, each under its
    region mask): both turn identities into tokens with `tokens()` and pass them, with the
    per-image strengths from `weights()`, in the call's conditioning (`method=adapter.method`)."""

    def __init__(self, pipe, src: IPAdapterSource, profile_name: str = "?"):
        method = src.variant
        if method not in VARIANTS:
            raise ProfileError(f"profile {profile_name!r}: identity method must be one of {VARIANTS}", param="model")
        if method == "faceid-plus-v2" and not (src.image_encoder or src.tiny):
            raise ProfileError(f"profile {profile_name!r}: faceid-plus-v2 needs image_encoder "
                               f"(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", param="model")
        if method == "instantid" and not hasattr(pipe, "text_encoder_2"):
            raise ProfileError(f"profile {profile_name!r}: instantid needs an SDXL pipeline", param="model")
        self.source = src
        if src.tiny and method != "faceid":  # write the real layout to disk, then load it like real files
            import dataclasses

            src = dataclasses.replace(src, **tiny_method_files(method, pipe.unet))
        if src.tiny and method == "faceid":
            state = tiny_faceid_state_dict(pipe.unet, lora_rank=src.lora_rank or TINY_LORA_RANK)
        else:
            path = _checkpoint_path(src, profile_name)
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
        with _quiet_diffusers():
            projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
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
            self._load_image_encoder(src, profile_name)
        if method == "instantid":
            self._load_identitynet(src, profile_name)
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
        return self.method == "faceid-plus-v2"

    @property
    def tokens_per_face(self) -> int:
        return INSTANTID_TOKENS if self.method == "instantid" else FACEID_TOKENS

    def _source_folder(self, src: IPAdapterSource, name: str, subfolder: str | None, profile_name: str) -> str:
        """A model folder: `name` itself when it is a local directory, else inside local_path,
        else a hub repo snapshot (name, or the adapter's repo with a subfolder)."""
        if os.path.isdir(name):
            return os.path.join(name, subfolder or "")
        if src.local_path and os.path.isdir(os.path.join(src.local_path, name)):
            return os.path.join(src.local_path, name, subfolder or "")
        return name

    def _load_image_encoder(self, src: IPAdapterSource, profile_name: str) -> None:
        """Plus v2: the CLIP vision encoder (ViT-H for the released files) and its processor."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        where = self._source_folder(src, src.image_encoder, src.image_encoder_subfolder, profile_name)
        kwargs = {} if os.path.isdir(where) or not src.image_encoder_subfolder else {"subfolder": src.image_encoder_subfolder}
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

    def _load_identitynet(self, src: IPAdapterSource, profile_name: str) -> None:
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
                net = ControlNetModel.from_pretrained(src.repo_id, subfolder=name, dtype=param.dtype)
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


def _adapters(model) -> dict:
    return model.state.setdefault("identity_adapters", {})


def resolve_method(profile, method: str | None) -> str | None:
    """The request's identity method, or the profile's default; a method the profile does not
    offer is a RequestValidationError naming `identityMethod`. A profile-like object that says
    nothing about identity methods (e.g. the service's profile summary) leaves it as asked."""
    offered = getattr(profile, "offered_identity_methods", None)
    if offered is None:
        return method
    if not offered:
        raise RequestValidationError(
            f"model {profile.name!r} has no IP-Adapter configured (identity_methods / ip_adapter in models.yaml), "
            f"so it cannot do identity-preserving generation", param="model")
    chosen = method or profile.identity_method
    if chosen not in offered:
        raise RequestValidationError(f"identityMethod {chosen!r} is not offered by model {profile.name!r}; it offers "
                                     f"{', '.join(offered)}", param="identityMethod")
    return chosen


def identity_adapter(model, method: str | None = None) -> IdentityAdapter:
    """The model's adapter for `method` (None: the profile's default), loaded with the model;
    loaded again here after a release. `model.state["ip_adapter"]` is the default method's."""
    method = resolve_method(model.profile, method)
    adapters = _adapters(model)
    adapter = adapters.get(method)
    if adapter is None or not adapter.loaded:
        adapter = IdentityAdapter(model.pipe, model.profile.identity_methods[method], model.profile.name)
        adapters[method] = adapter
        if method == model.profile.identity_method:
            model.state["ip_adapter"] = adapter
        if model.warm:  # at load, the engine reads `applied` once everything is in place
            model.refresh_applied()
    return adapter


def release_identity_adapter(model, method: str | None = None) -> bool:
    """Unload the model's identity adapters (or one method's) to free their memory; the next
    identity request loads them again (and, on a compiled model, compiles the identity graphs
    again). Returns whether one was loaded."""
    adapters = _adapters(model)
    names = [method] if method else list(adapters)
    released = False
    for name in names:
        adapter = adapters.pop(name, None)
        if adapter is not None and adapter.loaded:
            adapter.unload()
            released = True
        if model.state.get("ip_adapter") is adapter:
            model.state.pop("ip_adapter", None)
    if not adapters:
        model.state.pop("identity_adapters", None)
        model.state.pop("ip_adapter", None)
    if released:
        model.refresh_applied()
    return released
