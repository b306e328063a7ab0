"""Progress previews from a tiny autoencoder (TAESD): a rough image of the current latents
every few steps, for UIs that show a picture while a job runs.

TAESD decodes SD/SDXL latents with ~1 % of the VAE decoder's compute (diffusers'
AutoencoderTiny; madebyollin/taesd for SD1.5, madebyollin/taesdxl for SDXL, MIT licence).
Previews are approximations of the final image (softer, slightly shifted colours); the final
image always comes from the full VAE. Tiny and random-weight profiles get a seeded random
AutoencoderTiny of the real layout (no download), which exercises the path but shows noise.
"""
from __future__ import annotations

import torch

from ..errors import ProfileError

TAESD_REPOS = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}


def load_preview_decoder(profile, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderTiny

    if profile.tiny or profile.random_weights:
        torch.manual_seed(0)
        decoder = AutoencoderTiny()
    else:
        repo = TAESD_REPOS[profile.architecture]
        try:
            decoder = AutoencoderTiny.from_pretrained(repo)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"profile {profile.name!r}: speed.preview taesd needs {repo}: "
                               f"`huggingface-cli download {repo}` ({type(exc).__name__}: {exc})",
                               param="speed.preview") from exc
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def decode_previews(decoder, latents: torch.Tensor) -> list:
    """PIL images of a batch of (scaled) latents, as the pipeline holds them between steps."""
    from PIL import Image

    with torch.inference_mode():
        images = decoder.decode(latents.to(next(decoder.parameters()).dtype)).sample
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
