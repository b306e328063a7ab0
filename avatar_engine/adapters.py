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

Sources (models.yaml `ip_adapter`):
- `tiny: true`: seeded random weights of the real key layout, built in-process for the UNet at
  hand (tiny profiles; `lora_rank: 128` gives the released files' layout for the full-size
  random-weight profiles). `write_faceid_checkpoint` writes them to disk in the h94 format, so
  tests also run the file-loading route.
- `faceid`: `h94/IP-Adapter-FaceID` `ip-adapter-faceid_sd15.bin` / `ip-adapter-faceid_sdxl.bin`
  (hub id or a local directory; `.bin` or `.safetensors`).
- `faceid-plusv2`: `ip-adapter-faceid-plusv2_sd15.bin` / `_sdxl.bin` plus a CLIP image encoder
  (`image_encoder`, e.g. `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`); each call also needs CLIP
  hidden states of the aligned face crops (`clip_embeds`), set on the projection layer as the
  diffusers docs show. This path follows the docs but is not exercised offline.
"""
from __future__ import annotations

import contextlib
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


def attach_identity_weights(unet, ip_state: dict[str, torch.Tensor], profile_name: str = "?") -> int:
    """Give each AvatarAttnProcessor its layer's FaceID weights; returns the LoRA rank (0: none).
    Fails, naming the first missing key, when the checkpoint does not match the UNet."""
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
                raise ProfileError(f"profile {profile_name!r}: the IP-Adapter checkpoint does not fit this UNet "
                                   f"(no {key!r} for {name})", param="model")
            k_ip, v_ip = _linear(ip_state[key]), _linear(ip_state[f"{i}.to_v_ip.weight"])
        built[name] = IdentityWeights(lora, k_ip, v_ip)
    param = next(unet.parameters())
    for name, proc in procs.items():
        proc.identity = built[name].to(device=param.device, dtype=param.dtype)
    return rank


def detach_identity_weights(unet) -> None:
    from .attention import processors

    for proc in processors(unet).values():
        proc.identity = None


class IdentityAdapter:
    """A FaceID adapter attached to one pipeline's UNet processors.

    Shared by percify (one face per image) and cast (several faces per image, each under its
    region mask): both turn identities into tokens with `tokens()` and pass them, with the
    per-image strengths from `weights()`, in the call's conditioning."""

    def __init__(self, pipe, src: IPAdapterSource, profile_name: str = "?"):
        # Check the configuration before touching the pipeline.
        if src.variant not in VARIANTS:
            raise ProfileError(f"profile {profile_name!r}: ip_adapter.variant must be one of {VARIANTS}",
                               param="model")
        if src.tiny and src.variant != "faceid":
            raise ProfileError(f"profile {profile_name!r}: tiny IP-Adapter weights exist only for variant faceid",
                               param="model")
        if src.variant == "faceid-plusv2" and not src.image_encoder:
            raise ProfileError(f"profile {profile_name!r}: faceid-plusv2 needs ip_adapter.image_encoder "
                               f"(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", param="model")
        if src.tiny:
            state = tiny_faceid_state_dict(pipe.unet, lora_rank=src.lora_rank or TINY_LORA_RANK)
        else:
            path = _checkpoint_path(src, profile_name)
            try:
                state = read_checkpoint(path)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ProfileError(f"profile {profile_name!r}: could not read IP-Adapter weights {path!r} "
                                   f"({type(exc).__name__}: {exc})", param="model") from exc
        self.pipe = pipe
        self.source = src
        self.variant = src.variant
        self.lora_scale = float(src.lora_scale)
        unet = pipe.unet
        param = next(unet.parameters())
        with _quiet_diffusers():
            projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
        self.projection = projection.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
        self.lora_rank = attach_identity_weights(unet, state["ip_adapter"], profile_name)
        if src.variant == "faceid-plusv2":
            self._load_image_encoder(src, profile_name)
        self.loaded = True
        log.info("IP-Adapter %s loaded (%s), LoRA rank %s", self.variant,
                 "random weights" if src.tiny else (src.local_path or src.repo_id), self.lora_rank)

    @property
    def label(self) -> str:
        return f"{self.variant}{' (random weights)' if self.source.tiny else ''}"

    def _load_image_encoder(self, src: IPAdapterSource, profile_name: str) -> None:
        """Plus v2: CLIP ViT-H image encoder for the face crop (diffusers docs, IP-Adapter FaceID Plus)."""
        from transformers import CLIPVisionModelWithProjection

        try:
            enc = CLIPVisionModelWithProjection.from_pretrained(src.image_encoder, dtype=self.pipe.unet.dtype)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"profile {profile_name!r}: could not load image encoder {src.image_encoder!r}: "
                               f"download it with `huggingface-cli download {src.image_encoder}`. ({exc})",
                               param="model") from exc
        self.pipe.register_modules(image_encoder=enc.to(self.pipe.device).requires_grad_(False))
        self.projection.shortcut = True  # the "v2" in Plus v2
        self.projection.shortcut_scale = 1.0

    # ---- inputs -------------------------------------------------------------------------
    def tokens(self, per_image: Sequence[np.ndarray], do_cfg: bool,
               clip_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Identity tokens `[B (x2 under CFG), F, T, D]` for one call: per_image[i] is (512,) or
        (F, 512) for image i; the unconditional half is the projection of zero identities."""
        if self.variant == "faceid-plusv2" and clip_embeds is None:
            raise RequestValidationError("faceid-plusv2 needs CLIP embeddings of the face crops", param="photos")
        rows = [np.asarray(e, dtype=np.float32).reshape(-1, FACEID_EMBED_DIM) for e in per_image]
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError("every image in one call needs the same number of faces")
        param = next(self.projection.parameters())
        faces = torch.from_numpy(np.stack(rows)).to(device=param.device, dtype=param.dtype)  # [B, F, 512]
        if do_cfg:
            faces = torch.cat([torch.zeros_like(faces), faces])
        if clip_embeds is not None:
            self.projection.clip_embeds = clip_embeds.to(device=param.device, dtype=param.dtype)
        try:
            tokens = self.projection(faces.reshape(-1, FACEID_EMBED_DIM))  # [B·F, T, D]
        finally:
            if clip_embeds is not None:
                self.projection.clip_embeds = None
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
        """Remove the adapter's weights from the processors (and the image encoder)."""
        if not self.loaded:
            return
        detach_identity_weights(self.pipe.unet)
        if getattr(self.pipe, "image_encoder", None) is not None:
            self.pipe.register_modules(image_encoder=None)
        self.projection = None
        self.loaded = False


def identity_adapter(model) -> IdentityAdapter:
    """The model's FaceID adapter (loaded with the model; loaded again here after a release)."""
    adapter = model.state.get("ip_adapter")
    if adapter is None or not adapter.loaded:
        src = model.profile.ip_adapter
        if src is None:
            raise RequestValidationError(
                f"model {model.profile.name!r} has no IP-Adapter configured (ip_adapter in models.yaml), so it "
                f"cannot do identity-preserving generation", param="model")
        adapter = IdentityAdapter(model.pipe, src, model.profile.name)
        model.state["ip_adapter"] = adapter
    return adapter


def release_identity_adapter(model) -> bool:
    """Unload the model's FaceID adapter to free its memory; the next identity request loads it
    again (and, on a compiled model, compiles the identity graphs again). Returns whether one
    was loaded."""
    adapter = model.state.pop("ip_adapter", None)
    if adapter is None or not adapter.loaded:
        return False
    adapter.unload()
    return True
