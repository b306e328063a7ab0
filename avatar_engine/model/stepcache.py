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
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


def _call_block(block, sample, emb, context, cross_attention_kwargs, **kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=context,
                     cross_attention_kwargs=cross_attention_kwargs, **kwargs)
    return block(hidden_states=sample, temb=emb, **kwargs)


def _head(unet, sample, timestep, context, timestep_cond, added_cond_kwargs):
    """Time embedding, text context, conv_in, and whether the up blocks need explicit sizes."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
    forward_upsample_size = any(d % (2 ** unet.num_upsamplers) for d in sample.shape[-2:])
    return emb, context, unet.conv_in(sample), forward_upsample_size


def _up(unet, sample, res_samples, start: int, stop: int, emb, context, cross_attention_kwargs,
        forward_upsample_size):
    """Up blocks start..stop-1 on `sample`, each consuming its skip connections from the end of
    `res_samples`; returns (output, the skip connections left)."""
    n_up = len(unet.up_blocks)
    for i in range(start, stop):
        block = unet.up_blocks[i]
        n = len(block.resnets)
        res, res_samples = res_samples[-n:], res_samples[:-n]
        upsample_size = res_samples[-1].shape[2:] if (i < n_up - 1 and forward_upsample_size) else None
        sample = _call_block(block, sample, emb, context, cross_attention_kwargs, res_hidden_states_tuple=res,
                             upsample_size=upsample_size)
    return sample, res_samples


def _tail(unet, sample):
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def full_pass(unet, depth: int, sample, timestep, context, timestep_cond, cross_attention_kwargs, added_cond_kwargs):
    """UNet2DConditionModel.forward for SD1.5/SDXL (no ControlNet residuals, adapters or class
    labels), mirroring diffusers 0.42's step by step, that also returns the input of the outer
    `depth` up blocks: the feature the cached steps reuse. Pure (no state), so compiled it is
    one graph whatever the step."""
    emb, context, sample, upsample = _head(unet, sample, timestep, context, timestep_cond, added_cond_kwargs)
    res_samples: tuple = (sample,)
    for block in unet.down_blocks:
        sample, res = _call_block(block, sample, emb, context, cross_attention_kwargs)
        res_samples += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=context,
                                    cross_attention_kwargs=cross_attention_kwargs)
        else:
            sample = unet.mid_block(sample, emb)
    n_up, first_up = len(unet.up_blocks), len(unet.up_blocks) - depth
    feature, res_samples = _up(unet, sample, res_samples, 0, first_up, emb, context, cross_attention_kwargs, upsample)
    sample, _ = _up(unet, feature, res_samples, first_up, n_up, emb, context, cross_attention_kwargs, upsample)
    return _tail(unet, sample), feature


def cached_pass(unet, depth: int, feature, sample, timestep, context, timestep_cond, cross_attention_kwargs,
                added_cond_kwargs):
    """A cached step: conv_in and the outer `depth` down blocks (for their skip connections),
    then the outer up blocks on `feature`, which the last full pass returned. Pure, like
    `full_pass`."""
    emb, context, sample, upsample = _head(unet, sample, timestep, context, timestep_cond, added_cond_kwargs)
    res_samples: tuple = (sample,)
    for block in unet.down_blocks[:depth]:
        sample, res = _call_block(block, sample, emb, context, cross_attention_kwargs)
        res_samples += res
    n_up, first_up = len(unet.up_blocks), len(unet.up_blocks) - depth
    # The outer up blocks consume the first skip connections of the full list (conv_in and the
    # outer down blocks' resnets); drop the rest (e.g. the outer downsampler's output).
    res_samples = res_samples[:sum(len(unet.up_blocks[i].resnets) for i in range(first_up, n_up))]
    sample, _ = _up(unet, feature, res_samples, first_up, n_up, emb, context, cross_attention_kwargs, upsample)
    return _tail(unet, sample)


@dataclass
class StepCacheState:
    """Installed as the UNet's `forward`: picks the full or the cached pass per step, keeping the
    step counter and the kept feature here, in Python, outside any compiled graph — so a
    compiled UNet is three graphs (plain, full pass, cached pass) per variant, never one per
    step (`compile` swaps the three callables for compiled ones)."""

    interval: int
    depth: int
    plain: Callable  # the UNet's own forward: calls outside `step_cache(...)`, ControlNet residuals
    full: Callable  # (sample, timestep, context, timestep_cond, cak, added) -> (out, feature)
    cached: Callable  # (feature, sample, timestep, context, timestep_cond, cak, added) -> out
    active: bool = False
    step: int = 0
    feature: torch.Tensor | None = None
    full_steps: int = 0
    cached_steps: int = 0

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, attention_mask=None,
                 cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **kwargs):
        if not self.active or kwargs or attention_mask is not None:
            return self.plain(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                              attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                              added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
        args = (sample, timestep, encoder_hidden_states, timestep_cond, cross_attention_kwargs, added_cond_kwargs or {})
        if self.feature is None or self.step % self.interval == 0 or self.feature.shape[0] != sample.shape[0]:
            out, self.feature = self.full(*args)
            self.full_steps += 1
        else:
            out = self.cached(self.feature, *args)
            self.cached_steps += 1
        self.step += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def compile(self, compile_fn: Callable[[Callable], Callable]) -> None:
        """Replace the three passes with `compile_fn(pass)` (torch.compile with the engine's options)."""
        self.plain, self.full, self.cached = compile_fn(self.plain), compile_fn(self.full), compile_fn(self.cached)


def install_step_cache(unet, interval: int, depth: int) -> StepCacheState:
    """Make `unet.forward` a StepCacheState; outside `step_cache(unet)` it is the original forward."""
    depth = max(1, min(depth, len(unet.down_blocks) - 1))
    state = StepCacheState(interval=interval, depth=depth, plain=unet.forward,
                           full=functools.partial(full_pass, unet, depth),
                           cached=functools.partial(cached_pass, unet, depth))
    unet.forward = state
    unet.avatar_step_cache = state
    return state


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
