"""Write a diffusers pipeline as one checkpoint in the original Stable Diffusion (LDM) layout —
what community `.safetensors` files look like — so single-file loading is tested without a download.

The inverse of diffusers' single_file_utils conversions (the official
convert_diffusers_to_original_stable_diffusion / _sdxl scripts), written for any block count so
the tiny pipelines convert too: UNet under `model.diffusion_model.`, VAE under
`first_stage_model.`, CLIP-L under `cond_stage_model.transformer.` (SD1.5) or
`conditioner.embedders.0.transformer.` (SDXL), SDXL's second encoder in OpenCLIP's layout under
`conditioner.embedders.1.model.`."""
from __future__ import annotations

import torch

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
          ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    config, state = unet.config, unet.state_dict()
    per = config.layers_per_block + 1
    blocks = len(config.block_out_channels)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
    for i in range(blocks):
        for j in range(config.layers_per_block):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")]
        for j in range(per):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.")]
        if i < blocks - 1:
            up_has_attention = "CrossAttn" in config.up_block_types[i]
            prefixes += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op."),
                         (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{2 if up_has_attention else 1}.")]
    prefixes += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    out = {}
    for key, value in state.items():
        new = key
        for ours, theirs in prefixes:
            if key.startswith(ours):
                new = theirs + key[len(ours):]
                if "resnets" in ours:
                    for ldm, diff in RESNET:
                        new = new.replace(f".{diff}.", f".{ldm}.")
                break
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    state = vae.state_dict()
    n = len(vae.config.block_out_channels)
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for side in ("encoder", "decoder"):
        prefixes += [(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1."),
                     (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2."),
                     (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")]
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = key
        for ours, theirs in prefixes:
            if key.startswith(ours):
                new = theirs + key[len(ours):]
                break
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            for diff, ldm in attn:
                new = new.replace(f".attn_1.{diff}", f".attn_1.{ldm}")
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def hf_clip_keys(text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights under transformers 4's names (`text_model.…`), the names
    checkpoints carry; transformers 5 drops the `text_model.` level from state_dict()."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection")) else "text_model." + key] = value
    return out


def open_clip_layout(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection → OpenCLIP's text tower keys (SDXL's second encoder)."""
    s = hf_clip_keys(text_encoder)
    out = {"positional_embedding": s["text_model.embeddings.position_embedding.weight"],
           "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
           "ln_final.weight": s["text_model.final_layer_norm.weight"],
           "ln_final.bias": s["text_model.final_layer_norm.bias"],
           "text_projection": s["text_projection.weight"].T.contiguous()}
    for i in range(text_encoder.config.num_hidden_layers):
        d, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[o + f"attn.in_proj_{part}"] = torch.cat([s[d + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[o + f"attn.out_proj.{part}"] = s[d + f"self_attn.out_proj.{part}"]
            out[o + f"ln_1.{part}"] = s[d + f"layer_norm1.{part}"]
            out[o + f"ln_2.{part}"] = s[d + f"layer_norm2.{part}"]
            out[o + f"mlp.c_fc.{part}"] = s[d + f"mlp.fc1.{part}"]
            out[o + f"mlp.c_proj.{part}"] = s[d + f"mlp.fc2.{part}"]
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    out = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    te = hf_clip_keys(pipe.text_encoder)
    if getattr(pipe, "text_encoder_2", None) is None:
        out.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        out.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_layout(pipe.text_encoder_2).items()})
    return {k: v.detach().contiguous() for k, v in out.items()}
