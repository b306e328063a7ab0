"""Tiny pipelines of the real SD1.5 / SDXL architectures, built from config with seeded random
weights and the real CLIP BPE vocabulary, so every machine builds the same model offline.

Built once and cached on disk (save_pretrained) under the engine cache directory; later loads
go through the same `from_pretrained` path real weights use.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import cache_dir
from ..io import build_dir_atomically

_VOCAB_GZ = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BUILD_VERSION = "1"  # bump when the tiny configs below change


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte→unicode table (the same as CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(directory: Path) -> Path:
    """Convert OpenAI's CLIP BPE file into vocab.json + merges.txt (49408 tokens) that
    `CLIPTokenizer.from_pretrained(directory)` reads, exactly like the reference tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    merges_lines = gzip.open(_VOCAB_GZ).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges_lines]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}), encoding="utf-8")
    return directory


def _text_encoder_config(with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks so the latent scale factor is the real 8.
    return AutoencoderKL(
        block_out_channels=[32, 32, 64, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)


def build_tiny_pipeline(architecture: str):
    """Construct (not load) a tiny pipeline with seeded weights."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="ae-tok-")))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    torch.manual_seed(0)
    if architecture == "sd15":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        )
        torch.manual_seed(1)
        vae = _vae()
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(_text_encoder_config())
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    if architecture == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
        )
        torch.manual_seed(1)
        vae = _vae()
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(_text_encoder_config())
        torch.manual_seed(3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(with_projection=True))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), image_encoder=None, feature_extractor=None,
            force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"no tiny builder for architecture {architecture!r}")


def build_full_random_pipeline(architecture: str, device: Any = "cpu"):
    """The real SD1.5 / SDXL architecture at full size with seeded random weights: for speed
    benchmarks on a GPU without downloading weights (images are noise). The models are built on
    `device`, so a GPU initialises their weights itself (built on the CPU, they took 18 s for
    SD1.5 and 41 s for SDXL of an H200 session's 15-minute device budget); the tokenizer and the
    scheduler stay on the CPU as in any loaded pipeline."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="ae-tok-")))
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    shutil.rmtree(tok_dir, ignore_errors=True)
    scheduler = _scheduler()
    torch.manual_seed(0)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                           bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                            sample_size=1024 if architecture == "sdxl" else 512,
                            scaling_factor=0.13025 if architecture == "sdxl" else 0.18215)
        text_encoder = CLIPTextModel(clip_l)
        if architecture == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        else:
            text_encoder_2 = CLIPTextModelWithProjection(big_g)
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    if architecture == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     image_encoder=None, feature_extractor=None)


def _build_key(architecture: str) -> str:
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256(f"{architecture}|{BUILD_VERSION}|{diffusers.__version__}|{transformers.__version__}|{torch.__version__}".encode())
    return f"tiny-{architecture}-{h.hexdigest()[:12]}"


@lru_cache(maxsize=None)
def tiny_pipeline_dir(architecture: str) -> Path:
    """Directory holding the saved tiny pipeline (built on first use; atomic rename so
    concurrent processes never see half a model)."""
    target = cache_dir() / "tiny" / _build_key(architecture)
    if (target / "model_index.json").exists():
        return target

    build_dir_atomically(target, lambda tmp: build_tiny_pipeline(architecture).save_pretrained(
        str(tmp), safe_serialization=True))
    return target
