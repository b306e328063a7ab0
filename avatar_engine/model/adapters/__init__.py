"""Identity methods on a loaded pipeline, split by concern: checkpoints (finding, reading and
attaching weights), tiny_weights (seeded random weights in the released layouts), instantid
(keypoints and the IdentityNet), adapter (`IdentityAdapter`: one method on one UNet) and
registry (a model's adapters: load at model load, get per request, release)."""
from __future__ import annotations

from .adapter import IdentityAdapter
from .checkpoints import attach_identity_weights, checkpoint_path, detach_identity_weights, read_checkpoint
from .instantid import (KPS_COLORS, IdentityNet, draw_kps, frontal_kps, keypoint_images, kps_in_box,
                        kps_in_frame)
from .registry import identity_adapter, load_identity_adapter, release_identity_adapter
from .tiny_weights import (FACEID_EMBED_DIM, FACEID_TOKENS, INSTANTID_TOKENS, TINY_ADAPTER_SEED, TINY_LORA_RANK,
                           tiny_faceid_plus_state_dict, tiny_faceid_state_dict, tiny_instantid_state_dict,
                           tiny_method_files, write_faceid_checkpoint)

__all__ = [
    "FACEID_EMBED_DIM", "FACEID_TOKENS", "INSTANTID_TOKENS", "KPS_COLORS", "TINY_ADAPTER_SEED", "TINY_LORA_RANK",
    "IdentityAdapter", "IdentityNet", "attach_identity_weights", "checkpoint_path", "detach_identity_weights",
    "draw_kps", "frontal_kps", "identity_adapter", "keypoint_images", "kps_in_box", "kps_in_frame",
    "load_identity_adapter", "read_checkpoint", "release_identity_adapter", "tiny_faceid_plus_state_dict",
    "tiny_faceid_state_dict", "tiny_instantid_state_dict", "tiny_method_files", "write_faceid_checkpoint",
]
