"""The DNP-ConFormer trainer: a MONAI ``SupervisedTrainer`` with the method's own iteration.

One iteration = (optional masked-image warm-up stage) or (EMA teacher update -> student/teacher forward ->
soft-mining cosine + Diversity-Aware Alignment losses -> backward -> decoder-side gradient clipping ->
optimizer and LR-scheduler step). Gradients are cleared every step. A batch with an "exclude" key (known
lesions, from exclusion masks) leaves the tokens that touch them out of both stages' losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from monai_dnprd.anomaly_map import group_feature_spread, prototype_usage
from monai_dnprd.distributed import average_gradients, is_distributed
from monai_dnprd.losses import token_keep
from monai_dnprd.networks.ema import ema_update
from monai_dnprd.networks.mim import mim_loss

__all__ = ["DNPTrainer", "autocast_context"]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` in {"fp32", "bf16", "fp16"}; fp16 only on CUDA, bf16 on CPU or CUDA."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return torch.autocast(device.type, dtype=dtype)


class DNPTrainer(SupervisedTrainer):
    """Iteration-based trainer for ``DNPConFormer`` (student encoder, EMA teacher, prototypes, decoder).

    Args beyond ``SupervisedTrainer``:
        lr_scheduler: stepped after every optimizer step (iteration-based schedule).
        warmup_iterations: first iterations train only the encoder with masked-image modelling (``mim_head``).
        mim_head: the MIM prediction head (needed when ``warmup_iterations > 0``).
        mask_ratio: fraction of patches masked in the warm-up.
        mim_visible_weight: weight of the visible patches in the warm-up loss (0: masked patches only).
        grad_clip: max gradient norm of the decoder-side parameters (paper: 0.1); <= 0 disables.
        precision: "fp32", "bf16" (CPU or CUDA) or "fp16" (CUDA, with a gradient scaler).
    """

    def __init__(
        self,
        *args: Any,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        warmup_iterations: int = 0,
        mim_head: torch.nn.Module | None = None,
        mask_ratio: float = 0.6,
        mim_visible_weight: float = 0.0,
        grad_clip: float = 0.1,
        precision: str = "fp32",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)  # DNPOutput is not a batch to decollate
        if kwargs.get("epoch_length") is not None and int(kwargs["epoch_length"]) < 1:
            raise ValueError(f"num_iterations must be at least 1, got {kwargs['epoch_length']} (nothing would be "
                             "trained, exported or calibrated)")
        super().__init__(*args, **kwargs)
        if warmup_iterations > 0 and mim_head is None:
            raise ValueError("warmup_iterations > 0 needs a mim_head")
        self.lr_scheduler = lr_scheduler
        self.warmup_iterations = int(warmup_iterations)
        self.mim_head = mim_head
        self.mask_ratio = float(mask_ratio)
        self.mim_visible_weight = float(mim_visible_weight)
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
        clean = batchdata.get("clean") if isinstance(batchdata, dict) else None  # pseudo-anomaly training
        if clean is not None:
            clean = torch.as_tensor(clean).to(images.device, non_blocking=engine.non_blocking).float()
        net = engine._unwrapped()
        exclude = batchdata.get("exclude") if isinstance(batchdata, dict) else None
        keep = None  # tokens of known lesions (exclusion masks) are left out of every loss
        if exclude is not None:
            keep = token_keep(torch.as_tensor(exclude).to(images.device), net.encoder.patch_size)
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
                engine.mim_head.train()
                # the warm-up learns normal tissue: from the clean stacks when the student's carry pseudo-anomalies
                loss = mim_loss(net.encoder, engine.mim_head, images if clean is None else clean,
                                mask_ratio=engine.mask_ratio, keep=None if keep is None else keep.flatten(1),
                                visible_weight=engine.mim_visible_weight)
                stats["mim"] = float(loss.detach())
            else:
                if it == engine.warmup_iterations + 1 and engine.warmup_iterations > 0:
                    ema_update(net.teacher, net.encoder, beta=0.0)  # teacher starts from the warmed-up student
                net.update_teacher()
                out = engine.network(images, clean)  # the teacher reads `clean` when given, else `images`
                engine.state.output[Keys.PRED] = out
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                losses = engine.loss_function(out) if keep is None else engine.loss_function(out, keep=keep)
                loss = losses["loss"]
                stats.update({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
                with torch.no_grad():
                    stats["teacher_spread"] = float(group_feature_spread(out.targets))
                    assignments = out.assignments if keep is None else out.assignments[keep.flatten(1) > 0]
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
