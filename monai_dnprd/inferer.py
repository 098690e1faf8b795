"""Volume inference: run the 2D DNP-ConFormer over every slice of a volume (2.5D) and build the 3D map.

All slices of a volume that hold foreground go through the network in batches; each slice map is computed on
the token grid, upsampled straight to the slice's own in-plane size, blurred, stacked back in z, optionally
smoothed along z and zeroed outside the foreground. The result carries the input's meta so that MONAI's
``Invertd`` can bring it back to the original image space.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_dnprd.anomaly_map import gaussian_blur1d, slice_anomaly_map
from monai_dnprd.engines.trainer import autocast_context
from monai_dnprd.transforms.array import ResizeSlices, SliceStack25D

__all__ = ["DNPVolumeInferer"]


class DNPVolumeInferer(Inferer):
    """Slice-wise (2.5D) anomaly-map inference for one volume ``(C, X, Y, Z)`` -> map ``(1, X, Y, Z)``.

    Args:
        img_size: the network's input size (slices are resized to ``img_size``^2 and maps resized back).
        k: neighbouring slices on each side stacked as channels (must match training).
        axis: the slicing axis (-1: last spatial axis, axial after orientation to RAS).
        batch_size: slices per forward pass.
        sigma: Gaussian blur of each slice map, in pixels of the network input (scaled to the slice's size).
        z_sigma: Gaussian smoothing across slices, in slices (0 disables).
        precision: "fp32" or "bf16" autocast for the network.
    """

    def __init__(
        self,
        img_size: int,
        k: int = 1,
        axis: int = -1,
        batch_size: int = 32,
        sigma: float = 2.0,
        z_sigma: float = 0.0,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.k = int(k)
        self.axis = int(axis)
        self.batch_size = int(batch_size)
        self.sigma = float(sigma)
        self.z_sigma = float(z_sigma)
        self.precision = precision
        self.stacker = SliceStack25D(k=self.k, axis=self.axis)
        self.resize = ResizeSlices(self.img_size)

    def slice_maps(self, network: torch.nn.Module, stack: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Anomaly maps ``(N, 1, H, W)`` of a stack of 2.5D slices ``(N, C, H, W)``, batch by batch."""
        net = network.module if hasattr(network, "module") else network
        device = next(net.parameters()).device
        sigma_out = self.sigma * max(out_size) / self.img_size
        maps = []
        for start in range(0, stack.shape[0], self.batch_size):
            x = self.resize(stack[start : start + self.batch_size]).to(device)
            with autocast_context(device, self.precision):
                out = net(x)
            targets = [t.float() for t in out.targets]
            recons = [r.float() for r in out.recons]
            maps.append(slice_anomaly_map(targets, recons, out_size, sigma=sigma_out).cpu())
        if not maps:
            return torch.zeros((0, 1, *out_size))
        return torch.cat(maps, 0)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        network.eval()
        spatial = inputs.shape[1:]
        ax = self.axis % 3
        depth = spatial[ax]
        inplane = tuple(s for i, s in enumerate(spatial) if i != ax)
        with torch.inference_mode():
            stack = self.stacker(inputs)  # (Z, C', H, W)
            if mask is not None:
                m = torch.as_tensor(mask).bool()[0]
                keep = m.movedim(ax, 0).reshape(depth, -1).any(1)
            else:
                keep = torch.ones(depth, dtype=torch.bool)
            slice_maps = torch.zeros((depth, 1, *inplane), dtype=torch.float32)
            idx = torch.nonzero(keep).flatten()
            if idx.numel():
                slice_maps[idx] = self.slice_maps(network, torch.as_tensor(stack)[idx].float(), inplane)
            volume = self.stacker.unstack(slice_maps)  # (1, X, Y, Z)
            volume = torch.as_tensor(volume).float()
            if self.z_sigma > 0:
                volume = gaussian_blur1d(volume, self.z_sigma, dim=1 + ax)
            if mask is not None:
                volume = volume * torch.as_tensor(mask).to(volume.dtype)
        volume = volume.clone()  # leave inference mode (Invertd and writers may modify it)
        if isinstance(inputs, MetaTensor):
            return MetaTensor(volume, affine=inputs.affine.clone(), meta=dict(inputs.meta))
        return volume
