"""FLOPs per image from a model's config, and the share of the device's peak a run reached.

Counted with `torch.utils.flop_counter` on meta-device copies of the UNet and VAE decoder
(shapes only, no memory, no compute), attention included; this reproduces the published
anchors: SD1.5 UNet at 64x64 latents 0.803 TFLOP per forward, VAE decode at 512² 2.51 TFLOP.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (FLOP/s). H200: measured with a large bf16 matmul on the machine
# the anchors come from; the others are the vendors' dense (non-sparse) figures.
PEAK_BF16 = {"H200": 790e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def device_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, name
    return None, f"unknown ({name})"


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_forward_flops(pipe, batch: int, height: int, width: int) -> int:
    """FLOPs of one UNet forward (all rows of the batch) at this image size."""
    from diffusers import UNet2DConditionModel

    cfg = pipe.unet.config
    scale = getattr(pipe, "vae_scale_factor", 8)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        sample = torch.randn(batch, cfg.in_channels, height // scale, width // scale)
        cad = cfg.cross_attention_dim
        text = torch.randn(batch, 77, cad if isinstance(cad, int) else cad[0])
        kwargs = {}
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
        t = torch.tensor([10] * batch)
        return _count(lambda: unet(sample, t, text, **kwargs))


def vae_decode_flops(pipe, height: int, width: int) -> int:
    from diffusers import AutoencoderKL

    scale = getattr(pipe, "vae_scale_factor", 8)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(pipe.vae.config)
        z = torch.randn(1, vae.config.latent_channels, height // scale, width // scale)
        return _count(lambda: vae.decode(z))


def image_flops(pipe, height: int, width: int, steps: int, cfg: bool) -> float:
    """FLOPs to make one image: `steps` UNet forwards (two rows under CFG) + one VAE decode."""
    return steps * unet_forward_flops(pipe, 2 if cfg else 1, height, width) + vae_decode_flops(pipe, height, width)
