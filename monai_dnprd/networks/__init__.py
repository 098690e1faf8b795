"""Networks: DINOv2-layout ViT encoder, EMA teacher, DNP-ConFormer and the masked-image-modelling head."""

from .dnp import DNPConFormer, DNPOutput, PrototypeAttentionBlock, PrototypeExtractor
from .ema import ema_update, make_teacher
from .masks import (
    checkerboard_mask,
    hidden_index,
    inference_masks,
    patchify,
    put_tokens,
    random_checkerboard_mask,
    random_patch_mask,
    take_tokens,
)
from .mim import MIMHead, mim_loss
from .vit import VIT_PRESETS, ViTEncoder, default_groups, default_taps, load_dinov2_weights

__all__ = [
    "VIT_PRESETS",
    "ViTEncoder",
    "default_taps",
    "default_groups",
    "load_dinov2_weights",
    "ema_update",
    "make_teacher",
    "DNPOutput",
    "PrototypeExtractor",
    "PrototypeAttentionBlock",
    "DNPConFormer",
    "MIMHead",
    "mim_loss",
    "patchify",
    "random_patch_mask",
    "checkerboard_mask",
    "random_checkerboard_mask",
    "inference_masks",
    "hidden_index",
    "take_tokens",
    "put_tokens",
]
