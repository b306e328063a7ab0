"""Identity-method checkpoints: finding the weight file, reading it, building the image
projection, and handing each attention processor its layer's weights.

Finding a file is split by who asks: `checkpoint_path(..., download=True)` (model load) may
fetch from the hub; with `download=False` (a request) only local files and the hub cache are
read, so serving a request never reaches `hf_hub_download`."""
from __future__ import annotations

import contextlib
import os

import torch
from diffusers.utils import logging as dlog
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from safetensors.torch import load_file

from ...config import IPAdapterSource
from ...errors import ProfileError
from ..attention import IdentityWeights, LoRAProjection, processors


@contextlib.contextmanager
def _quiet_diffusers():
    """The projection converter logs expected noise (low_cpu_mem_usage without accelerate hooks)."""
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def checkpoint_path(src: IPAdapterSource, profile_name: str, *, download: bool = False) -> str:
    """The weight file on local disk. With `repo_id`: fetched from the hub when `download`
    (model load), else only found in the hub cache (a request must never download)."""
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
    if not download:
        filename = "/".join(p for p in (src.subfolder, src.weight_name) if p)
        cached = try_to_load_from_cache(src.repo_id, filename)
        if isinstance(cached, str):
            return cached
        raise ProfileError(f"profile {profile_name!r}: IP-Adapter {src.weight_name!r} from {src.repo_id!r} is not "
                           f"downloaded; it is fetched when the model loads. {hint}", param="model")
    try:
        return hf_hub_download(src.repo_id, src.weight_name, subfolder=src.subfolder)
    except Exception as exc:  # noqa: BLE001 - offline, missing file, auth: all mean "get the file first"
        raise ProfileError(f"profile {profile_name!r}: could not fetch IP-Adapter {src.weight_name!r} from "
                           f"{src.repo_id!r}: {hint}, or set ip_adapter.local_path. ({type(exc).__name__}: {exc})",
                           param="model") from exc


def read_checkpoint(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": ..., "ip_adapter": ...}` from an h94 `.bin` or a `.safetensors` file
    (flat keys prefixed `image_proj.` / `ip_adapter.`)."""
    if path.endswith(".safetensors"):
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
    for proc in processors(unet).values():
        for name in [method] if method else list(proc.identities.keys()):
            if name in proc.identities:
                del proc.identities[name]


def convert_image_projection(unet, image_proj: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The checkpoint's image projection as diffusers' module (ImageProjection, the FaceID /
    FaceID Plus projections, or InstantID's Resampler as IPAdapterPlusImageProjection).

    diffusers has no public way to build one from a state dict without also swapping the UNet's
    attention processors (`load_ip_adapter`), which would break compiled graphs; its key
    remapping lives only in the private `UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers`.
    This is the one place that calls it; if diffusers renames it, only this function changes."""
    with _quiet_diffusers():
        return unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
