"""The DNP-ConFormer trainer: a MONAI ``SupervisedTrainer`` with the method's own iteration.

One iteration = (optional masked-image warm-up stage) or (EMA teacher update -> student/teacher forward ->
soft-mining cosine + Diversity-Aware Alignment losses -> backward -> decoder-side gradient clipping ->
optimizer and LR-scheduler step). Gradients are cleared every step. A batch with an "exclude" key (known
lesions, from exclusion masks) leaves the tokens that touch them out of both stages' losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from monai_dnprd.anomaly_map import group_feature_spread, prototype_usage
from monai_dnprd.config import autocast_context
from monai_dnprd.distributed import average_gradients, is_distributed
from monai_dnprd.losses import token_keep
from monai_dnprd.networks.ema import ema_update
from monai_dnprd.networks.masks import random_checkerboard_mask
from monai_dnprd.networks.mim import mim_loss

__all__ = ["DNPTrainer", "monitored_tokens", "token_tissue"]


def token_tissue(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 1, H, W) foreground mask of the input slices -> (B, 1, H/p, W/p) bool: tokens at least half of whose
    patch is foreground (tissue, not background)."""
    return F.avg_pool2d(mask.float(), patch_size) >= 0.5


def monitored_tokens(hide: torch.Tensor, keep: torch.Tensor | None = None,
                     tissue: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the tokens the prototype monitor counts. Visible ones (the prototypes are read from them), not
    excluded (``keep``, (B, 1, h, w)), and tissue (``token_tissue``): background tokens are alike and would fill
    prototypes of their own, making the share look diverse while the tissue sits on one prototype."""
    counted = ~hide
    for m in (keep, tissue):
        if m is not None:
            counted = counted & (m.flatten(1) > 0)
    return counted


class DNPTrainer(SupervisedTrainer):
    """Iteration-based trainer for ``DNPConFormer`` (student encoder, EMA teacher, prototypes, decoder).

    Args beyond ``SupervisedTrainer``:
        lr_scheduler: stepped after every optimizer step (iteration-based schedule).
        warmup_iterations: first iterations train only the encoder and the network's pixel head with
            masked-image modelling.
        mask_ratio: fraction of patches masked in the warm-up.
        grad_clip: max gradient norm of the decoder-side parameters (paper: 0.1); <= 0 disables.
        precision: "fp32", "bf16" (CPU or CUDA), "fp16" (CUDA, with a gradient scaler) or "auto" (bf16 where the
            hardware computes it natively: CUDA, CPUs with AVX512-BF16 or AMX; ``config.resolve_precision``).
    """

    def __init__(
        self,
        *args: Any,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        warmup_iterations: int = 0,
        mask_ratio: float = 0.6,
        grad_clip: float = 0.1,
        precision: str = "fp32",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)  # DNPOutput is not a batch to decollate
        if kwargs.get("epoch_length") is not None and int(kwargs["epoch_length"]) < 1:
            raise ValueError(f"num_iterations must be at least 1, got {kwargs['epoch_length']} (nothing would be "
                             "trained, exported or calibrated)")
        super().__init__(*args, **kwargs)
        self.lr_scheduler = lr_scheduler
        self.warmup_iterations = int(warmup_iterations)
        self.mask_ratio = float(mask_ratio)
        self.grad_clip = float(grad_clip)
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def _unwrapped(self) -> torch.nn.Module:
        """The DNPConFormer itself (DDP wraps it in ``.module``)."""
        net = self.network
        return net.module if hasattr(net, "module") else net

    def _iteration(self, engine: DNPTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images = batchdata[Keys.IMAGE] if isinstance(batchdata, dict) else batchdata
        images = torch.as_tensor(images).to(engine.state.device, non_blocking=engine.non_blocking).float()
        net = engine._unwrapped()
        exclude = batchdata.get("exclude") if isinstance(batchdata, dict) else None
        keep = None  # tokens of known lesions (exclusion masks) are left out of every loss
        if exclude is not None:
            keep = token_keep(torch.as_tensor(exclude).to(images.device), net.encoder.patch_size)
        fg = batchdata.get("mask") if isinstance(batchdata, dict) else None  # for the prototype monitor
        it = engine.state.iteration  # 1-based, already incremented by Ignite
        warmup = it <= engine.warmup_iterations
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output = {Keys.IMAGE: images}
        stats: dict[str, float] = {}
        if keep is not None:
            stats["excluded_tokens"] = float(1.0 - keep.mean())  # share of the batch's tokens left out
        with autocast_context(engine.state.device, engine.precision):
            if warmup:
                loss = mim_loss(net.encoder, net.pixel_head, images,
                                mask_ratio=engine.mask_ratio, keep=None if keep is None else keep.flatten(1))
                stats["mim"] = float(loss.detach())
            else:
                if it == engine.warmup_iterations + 1 and engine.warmup_iterations > 0:
                    ema_update(net.teacher, net.encoder, beta=0.0)  # teacher starts from the warmed-up student
                net.update_teacher()
                # context-only decoding: a random block checkerboard of tokens the student does not see
                grid = (images.shape[-2] // net.encoder.patch_size, images.shape[-1] // net.encoder.patch_size)
                hide = random_checkerboard_mask(images.shape[0], grid, net.mask_block, images.device)
                out = engine.network(images, mask=hide)
                engine.state.output[Keys.PRED] = out
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                losses = engine.loss_function(out) if keep is None else engine.loss_function(out, keep=keep)
                loss = losses["loss"]
                stats.update({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
                with torch.no_grad():
                    stats["teacher_spread"] = float(group_feature_spread(out.targets))
                    tissue = None if fg is None else token_tissue(torch.as_tensor(fg).to(images.device),
                                                                  net.encoder.patch_size)
                    assignments = out.assignments[monitored_tokens(hide, keep, tissue)]
                    usage = prototype_usage(assignments, out.prototypes.shape[1]).float()
                    stats["prototypes_used"] = float((usage > 0).sum())
                    stats["prototype_max_share"] = float(usage.max() / usage.sum().clamp_min(1))
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.grad_scaler is not None:
            engine.grad_scaler.scale(loss).backward()
            engine.grad_scaler.unscale_(engine.optimizer)
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if is_distributed():
            params = [p for g in engine.optimizer.param_groups for p in g["params"]]
            average_gradients(params)
        if not warmup and engine.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.param_groups()["decoder"], engine.grad_clip)
        if engine.grad_scaler is not None:
            engine.grad_scaler.step(engine.optimizer)
            engine.grad_scaler.update()
        else:
            engine.optimizer.step()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        stats["loss"] = float(loss.detach())
        stats["stage"] = 0.0 if warmup else 1.0
        for group in engine.optimizer.param_groups:
            stats[f"lr_{group.get('name', 'group')}"] = float(group["lr"])
        engine.state.output.update(stats)
        return engine.state.output
