"""Volume inference: run the 2D DNP-ConFormer over every slice of a volume (2.5D) and build the 3D map.

All slices of a volume that hold foreground go through the ``AnomalyMapper`` in batches (resized to the
network's input size), at two phases of the token grid (``grid_phases``); each slice map is resized back to the
slice's own in-plane size, stacked back in z, optionally smoothed along z, zeroed outside the foreground and, when
only bright or dark anomalies are sought, weighted by the voxel's intensity rank (``polarity``), and lowered where
the map is as high at the voxel's left-right mirror point (``symmetry``, ``symmetry.MirrorSuppression``). The
result carries the input's meta so that MONAI's ``Invertd`` can bring it back to the original image space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_dnprd.anomaly_map import check_grid_phases, check_polarity, gaussian_blur1d, phase_min, polarity_gate
from monai_dnprd.config import autocast_context
from monai_dnprd.symmetry import MirrorSuppression
from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

__all__ = ["DNPVolumeInferer", "image_affine"]


def image_affine(image: torch.Tensor) -> torch.Tensor:
    """The voxel-to-world affine of a ``MetaTensor`` (the identity for a plain tensor)."""
    return image.affine if isinstance(image, MetaTensor) else torch.eye(4, dtype=torch.float64)


class DNPVolumeInferer(Inferer):
    """Slice-wise (2.5D) anomaly-map inference for one volume ``(C, X, Y, Z)`` -> map ``(1, X, Y, Z)``.

    The network it is called with is an ``AnomalyMapper`` (stacks -> slice maps at the network's input size).

    Args:
        img_size: the network's input size (slices are resized to ``img_size``^2 and maps resized back).
        k: neighbouring slices on each side stacked as channels (must match training).
        axis: the slicing axis (-1: last spatial axis, axial after orientation to RAS).
        batch_size: slices per forward pass.
        z_sigma: Gaussian smoothing across slices, in slices (0 disables).
        precision: "fp32", "bf16" or "auto" autocast for the network (``config.resolve_precision``; the map's own
            maths stay in fp32).
        grid_phases: 2 (default) takes each pixel's minimum over the slice's map and the map of the slice shifted by
            half a patch diagonally (``phase_min``); 1 maps the slice once, at half the cost.
        polarity: "any" (default), "bright" or "dark": multiply the map by the voxel's intensity rank in the
            foreground (of the first input channel), or by one minus it, when the lesions sought are known to be
            brighter (FLAIR hyperintensities) or darker than the tissue around them (``anomaly_map.polarity_gate``).
        symmetry: lower the map by the excess of its value at each voxel's left-right mirror point over
            ``mirror_threshold`` (the 99th percentile of the map on normal volumes, which ``calibrate`` fits and
            sets); while the threshold is None the map is returned without it.
        mirror_threshold: see ``symmetry``.
    """

    def __init__(
        self,
        img_size: int,
        k: int = 1,
        axis: int = -1,
        batch_size: int = 32,
        z_sigma: float = 0.0,
        precision: str = "fp32",
        polarity: str = "any",
        grid_phases: int = 2,
        symmetry: bool = False,
        mirror_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.k = int(k)
        self.axis = int(axis)
        self.batch_size = int(batch_size)
        self.z_sigma = float(z_sigma)
        self.precision = precision
        self.polarity = check_polarity(polarity)
        self.grid_phases = check_grid_phases(grid_phases)
        self.resize = ResizeSlices(self.img_size)
        self.symmetry = bool(symmetry)
        self.mirror_threshold = None if mirror_threshold is None else float(mirror_threshold)
        self.suppression = MirrorSuppression()

    def slice_maps(self, mapper: torch.nn.Module, stack: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Anomaly maps ``(N, 1, H, W)`` of one batch of 2.5D slices ``(N, C, H, W)`` at their own size ``out_size``."""
        device = next(mapper.parameters()).device
        x = self.resize(stack).to(device)
        with autocast_context(device, self.precision):
            maps = mapper(x) if self.grid_phases == 1 else phase_min(mapper, x)
        return F.interpolate(maps.float(), size=tuple(out_size), mode="bilinear", align_corners=False).cpu()

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        network.eval()
        ax = self.axis % 3
        spatial = tuple(inputs.shape[1:])
        depth = spatial[ax]
        inplane = tuple(s for i, s in enumerate(spatial) if i != ax)
        vol = torch.as_tensor(inputs).detach().float().cpu()
        if isinstance(vol, MetaTensor):
            vol = vol.as_tensor()
        fg = torch.as_tensor(mask).bool()[0] if mask is not None else None
        keep = fg.movedim(ax, 0).reshape(depth, -1).any(1) if fg is not None else torch.ones(depth, dtype=torch.bool)
        idx = torch.nonzero(keep).flatten()
        # slice-major copies (Z, H, W): gathering the 2.5D stacks, writing the slice maps and smoothing along z
        # then touch contiguous memory; the map goes back to the volume's axis order once, at the end
        vol_s = torch.movedim(vol, 1 + ax, 1).contiguous()
        out_s = torch.zeros((depth, *inplane), dtype=torch.float32)
        with torch.inference_mode():
            # 2.5D stacks are gathered batch by batch, never for the whole volume at once (memory ~ one batch)
            for start in range(0, idx.numel(), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                stack = gather_slice_stacks(vol_s, chunk, self.k, axis=0)
                out_s[chunk] = self.slice_maps(network, stack, inplane)[:, 0]
            del vol_s
            if self.z_sigma > 0:
                out_s = gaussian_blur1d(out_s, self.z_sigma, dim=0)
            if fg is not None:
                out_s.mul_(fg.movedim(ax, 0))
            gate = polarity_gate(vol[0], fg, self.polarity)
            if gate is not None:
                out_s.mul_(gate.movedim(ax, 0))
        # one copy back to the volume's axis order, made outside inference mode (Invertd and writers may modify it)
        volume = out_s.movedim(0, ax).clone(memory_format=torch.contiguous_format)[None]
        if self.symmetry and self.mirror_threshold is not None:
            volume[0] = self.suppression(volume[0], vol[0], image_affine(inputs), self.mirror_threshold)
        if isinstance(inputs, MetaTensor):
            result = MetaTensor(volume)
            result.copy_meta_from(inputs)  # affine, original geometry and applied operations, for Invertd
            return result
        return volume
