"""Momentum (EMA) teacher: a frozen copy of the student updated by exponential moving average."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_update", "make_teacher"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, beta: float) -> None:
    """theta_t <- beta * theta_t + (1 - beta) * theta_s for parameters; buffers are copied from the student."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"EMA beta must lie in [0, 1], got {beta}")
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    if t_params:
        s_data = [p.detach() for p in s_params]
        torch._foreach_mul_(t_params, beta)
        torch._foreach_add_(t_params, s_data, alpha=1.0 - beta)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of `student` with gradients off and in eval mode, to serve as the EMA teacher."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()
