"""Step caching (DeepCache, Ma et al. 2023): between two full UNet passes, reuse the deep
features and recompute only the outer blocks.

Adjacent denoising steps change the UNet's high-level (deep, low-resolution) features very
little. Every `interval` steps the full UNet runs and the input of its outer up block(s) is
kept; on the steps in between only conv_in, the outer `depth` down blocks (for their skip
connections), the outer `depth` up blocks on the kept feature, and conv_out run. With SD1.5 and
depth 1 a cached step costs roughly a fifth of a full one.

Effect on output: the images change (they are not the uncached pixels); DeepCache reports
near-unchanged quality at interval 3 on SD1.5 (CLIP score and FID within noise) and visible
softening past interval 5. Off by default (`step_cache_interval: 1`); tests measure the pixel
change and that interval 1 is exactly the plain UNet.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepCacheState:
    interval: int
    depth: int
    active: bool = False
    step: int = 0
    feature: torch.Tensor | None = None
    full_steps: int = 0
    cached_steps: int = 0


def _call_block(block, sample, emb, context, cross_attention_kwargs, **kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=context,
                     cross_attention_kwargs=cross_attention_kwargs, **kwargs)
    return block(hidden_states=sample, temb=emb, **kwargs)


def install_step_cache(unet, interval: int, depth: int) -> StepCacheState:
    """Wrap `unet.forward`; outside `step_cache(unet)` it is the original forward."""
    state = StepCacheState(interval=interval, depth=max(1, min(depth, len(unet.down_blocks) - 1)))
    original = unet.forward

    def forward(sample, timestep, encoder_hidden_states, timestep_cond=None, attention_mask=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **kwargs):
        if not state.active or kwargs or attention_mask is not None:
            return original(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                            attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                            added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
        out = _cached_forward(unet, state, sample, timestep, encoder_hidden_states, timestep_cond,
                              cross_attention_kwargs, added_cond_kwargs or {})
        state.step += 1
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = forward
    unet.avatar_step_cache = state
    return state


def _cached_forward(unet, state: StepCacheState, sample, timestep, context, timestep_cond,
                    cross_attention_kwargs, added_cond_kwargs) -> torch.Tensor:
    """UNet2DConditionModel.forward for SD1.5/SDXL (no ControlNet, adapters or class labels)
    with DeepCache's skip. Mirrors diffusers 0.42's forward step by step."""
    full = state.feature is None or state.step % state.interval == 0 or state.feature.shape[0] != sample.shape[0]
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
    forward_upsample_size = any(d % (2 ** unet.num_upsamplers) for d in sample.shape[-2:])
    sample = unet.conv_in(sample)
    res_samples: tuple = (sample,)
    depth = state.depth
    down = unet.down_blocks if full else unet.down_blocks[:depth]
    for block in down:
        sample, res = _call_block(block, sample, emb, context, cross_attention_kwargs)
        res_samples += res
    n_up = len(unet.up_blocks)
    first_up = n_up - depth
    if full:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=context,
                                        cross_attention_kwargs=cross_attention_kwargs)
            else:
                sample = unet.mid_block(sample, emb)
        ups = list(enumerate(unet.up_blocks))
        state.full_steps += 1
    else:
        sample = state.feature
        ups = [(i, unet.up_blocks[i]) for i in range(first_up, n_up)]
        # The outer up blocks consume the first skip connections of the full list (conv_in and
        # the outer down blocks' resnets); drop the rest (e.g. the outer downsampler's output).
        res_samples = res_samples[:sum(len(block.resnets) for _, block in ups)]
        state.cached_steps += 1
    for i, block in ups:
        if full and i == first_up:
            state.feature = sample
        n = len(block.resnets)
        res, res_samples = res_samples[-n:], res_samples[:-n]
        upsample_size = res_samples[-1].shape[2:] if (i < n_up - 1 and forward_upsample_size) else None
        sample = _call_block(block, sample, emb, context, cross_attention_kwargs, res_hidden_states_tuple=res,
                             upsample_size=upsample_size)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


@contextlib.contextmanager
def step_cache(unet) -> Any:
    """One pipeline call with step caching (a no-op when the UNet has none installed)."""
    state: StepCacheState | None = getattr(unet, "avatar_step_cache", None)
    if state is None:
        yield None
        return
    state.active, state.step, state.feature = True, 0, None
    try:
        yield state
    finally:
        state.active, state.feature = False, None
