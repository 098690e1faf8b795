"""Learning-rate schedules of the two training stages (masked-image warm-up, then DNP training).

Each optimizer parameter group gets its own absolute learning rate per iteration; ``LambdaLR`` with base lr 1
multiplies by it, so the values below are the learning rates themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["cosine_lr", "stage_lambdas", "build_optimizer"]


def cosine_lr(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``start`` to ``end`` at ``total``."""
    if total <= 0:
        return end
    if warmup > 0 and step < warmup:
        return start * (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def stage_lambdas(
    num_iterations: int,
    warmup_iterations: int,
    encoder_lr: float,
    decoder_lr: float,
    decoder_lr_min: float,
    mim_lr: float,
) -> dict[str, Callable[[int], float]]:
    """Learning rate per group and iteration: MIM warm-up first (encoder + pixel head), then DNP (all but the teacher).

    During the warm-up the decoder side is frozen (lr 0). The encoder trains at ``mim_lr`` (cosine) in the
    warm-up and at the small constant ``encoder_lr`` in the DNP stage, as in the paper; the pixel head follows
    ``mim_lr`` in the warm-up and the decoder side's schedule afterwards (it keeps learning context-only
    inpainting on the hidden tokens).
    """
    dnp_total = max(num_iterations - warmup_iterations, 1)
    lin = max(1, min(warmup_iterations // 10, 100))

    def encoder(it: int) -> float:
        if it < warmup_iterations:
            return cosine_lr(it, warmup_iterations, mim_lr, mim_lr * 0.05, warmup=lin)
        return encoder_lr

    def decoder(it: int) -> float:
        if it < warmup_iterations:
            return 0.0
        step = it - warmup_iterations
        return cosine_lr(step, dnp_total, decoder_lr, decoder_lr_min, warmup=min(50, dnp_total // 10))

    def pixel_head(it: int) -> float:
        if it < warmup_iterations:
            return cosine_lr(it, warmup_iterations, mim_lr, mim_lr * 0.05, warmup=lin)
        return decoder(it)

    return {"encoder": encoder, "decoder": decoder, "pixel_head": pixel_head}


def build_optimizer(
    network: torch.nn.Module,
    num_iterations: int,
    warmup_iterations: int = 0,
    encoder_lr: float = 1e-5,
    decoder_lr: float = 1e-4,
    decoder_lr_min: float = 1e-5,
    mim_lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the network's named groups ("encoder", "decoder", "pixel_head") and the per-group LambdaLR schedule."""
    net = network.module if hasattr(network, "module") else network
    param_groups = [{"params": params, "lr": 1.0, "name": name} for name, params in net.param_groups().items()]
    optimizer = torch.optim.AdamW(param_groups, lr=1.0, betas=tuple(betas), weight_decay=weight_decay)
    lambdas = stage_lambdas(num_iterations, warmup_iterations, encoder_lr, decoder_lr, decoder_lr_min, mim_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambdas[g["name"]] for g in param_groups])
    return optimizer, scheduler
