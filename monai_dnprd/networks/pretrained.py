"""Official DINOv2 backbone checkpoints by name: download into torch's hub cache, SHA-256 checked, or use the cache.

What is verified: every file is checked against the SHA-256 pinned in `DINOV2_CHECKPOINTS`, both right after a
download (before it is moved into the cache, so a bad download never lands there) and on every cache hit (so a
truncated, corrupted or replaced cache file is refused, never loaded). A checksum match proves the file is the
byte-for-byte official one; its tensors are then mapped onto the encoder by `vit.load_dinov2_weights`, which
checks every shape. The encoder's width, head count and patch size are checked against the name *before* any
download, so a checkpoint the encoder cannot hold is refused without touching the network.

Every failure is a `PretrainedWeightsError` (or `FileNotFoundError` for an unknown name) with a one-line message
raised outside any `except` block, so it is the innermost exception: no chained network error behind it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlsplit
from urllib.request import urlopen

from .vit import VIT_PRESETS, ViTEncoder  # vit.py imports this module only inside a function: no cycle

__all__ = [
    "DINOV2_CHECKPOINTS",
    "DOWNLOAD_TIMEOUT",
    "Dinov2Checkpoint",
    "PretrainedWeightsError",
    "check_encoder_fits",
    "dinov2_cache_path",
    "fetch_dinov2",
    "loadable_names",
]

DOWNLOAD_TIMEOUT = 20.0  # seconds to connect (DNS included) and per read: an offline machine fails fast, no retries
_CHUNK = 1 << 20


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the encoder (one-line message, for the CLI)."""


@dataclass(frozen=True)
class Dinov2Checkpoint:
    """One official DINOv2 backbone file: where it is, its SHA-256, and the ViT shape it needs."""

    url: str
    sha256: str
    embed_dim: int
    depth: int
    num_heads: int
    num_register_tokens: int
    patch_size: int = 14
    ffn: str = "mlp"  # "swiglu" for ViT-g: its MLP keys (w12/w3) have no counterpart in this encoder

    @property
    def filename(self) -> str:
        """Cache file name: the URL's basename, as torch.hub.load_state_dict_from_url names it (shared cache)."""
        return Path(urlsplit(self.url).path).name


_BASE = "https://dl.fbaipublicfiles.com/dinov2"


def _url(arch: str, registers: bool) -> str:
    """Official URL (facebookresearch/dinov2 dinov2/hub/backbones.py): <base>/<arch>/<arch>[_reg4]_pretrain.pth."""
    return f"{_BASE}/{arch}/{arch}{'_reg4' if registers else ''}_pretrain.pth"


# Names are the torch.hub entry points of facebookresearch/dinov2 (hubconf.py). SHA-256 values: the `expected_sha256`
# pinned for these exact URLs in finegrain-ai/refiners, src/refiners/conversion/models/dinov2.py. Independent
# public pins of the same URLs agree (found by code search; none was computed here, the build machine is offline):
# vits14 (several asset manifests, one with the size 88,283,115 bytes), vits14_reg4 (several download scripts with
# sha256 checks), vitb14 (synapse-net's pooch.retrieve known_hash and others; 346,378,731 bytes), vitb14_reg4
# (several, one with 346,393,545 bytes), vitl14 (one asset script). The vitl14_reg and vitg14 values rest on
# refiners alone; those names are refused by every current `vit` preset anyway.
_ARCHS = {  # (embed_dim, depth, num_heads, MLP) of ViT-S/B/L/g 14 in dinov2/models/vision_transformer.py
    "s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"), "l": (1024, 24, 16, "mlp"), "g": (1536, 40, 24, "swiglu"),
}
_SHA256 = {
    "dinov2_vits14": "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
    "dinov2_vits14_reg": "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb",
    "dinov2_vitb14": "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",
    "dinov2_vitb14_reg": "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71",
    "dinov2_vitl14": "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428",
    "dinov2_vitl14_reg": "36e4deffbaef061a2576705b0c36f93621e2ae20bf6274694821b0b492551b51",
    "dinov2_vitg14": "baf8467e50af277596bbbafa06887c177ee899ab46033649c383577d7e9309d3",
    "dinov2_vitg14_reg": "746ecb8c6301c645c5c855be91687d274587d6e48fdaec4a729753160b34a283",
}
DINOV2_CHECKPOINTS: dict[str, Dinov2Checkpoint] = {
    f"dinov2_vit{a}14{'_reg' if reg else ''}": Dinov2Checkpoint(
        url=_url(f"dinov2_vit{a}14", reg), sha256=_SHA256[f"dinov2_vit{a}14{'_reg' if reg else ''}"],
        embed_dim=dim, depth=depth, num_heads=heads, num_register_tokens=4 if reg else 0, ffn=ffn,
    )
    for a, (dim, depth, heads, ffn) in _ARCHS.items()
    for reg in (False, True)
}


def _preset_for(spec: Dinov2Checkpoint) -> str | None:
    """Name of the `vit` preset that builds this checkpoint's width and heads (None: no preset can hold it)."""
    if spec.ffn != "mlp":
        return None
    for name, p in VIT_PRESETS.items():
        if p["embed_dim"] == spec.embed_dim and p["num_heads"] == spec.num_heads:
            return name
    return None


def loadable_names() -> list[str]:
    """Checkpoint names some `vit` preset can hold, as 'name (vit=..., patch_size=...)', for messages."""
    out = []
    for name, spec in DINOV2_CHECKPOINTS.items():
        preset = _preset_for(spec)
        if preset is not None:
            out.append(f"{name} (vit={preset}, patch_size={spec.patch_size})")
    return out


def check_encoder_fits(encoder: ViTEncoder, name: str) -> None:
    """Refuse (before any download) a named checkpoint whose width, heads, MLP or patch size the encoder lacks."""
    spec = DINOV2_CHECKPOINTS[name]
    heads = encoder.blocks[0].attn.num_heads if len(encoder.blocks) else spec.num_heads
    have = f"embed_dim {encoder.embed_dim}, {heads} heads, patch_size {encoder.patch_size}"
    works = "names that work: " + ", ".join(loadable_names())
    preset = _preset_for(spec)
    if spec.ffn != "mlp":  # ViT-g's only other kind
        raise PretrainedWeightsError(
            f"pretrained {name}: its SwiGLU MLP blocks cannot be loaded into this encoder; {works}"
        )
    if (encoder.embed_dim, heads, encoder.patch_size) != (spec.embed_dim, spec.num_heads, spec.patch_size):
        need = f"vit={preset}" if preset else f"embed_dim={spec.embed_dim} (no vit preset builds it)"
        raise PretrainedWeightsError(
            f"pretrained {name} needs {need} with num_heads={spec.num_heads} and patch_size={spec.patch_size} "
            f"(and an img_size that is a multiple of {spec.patch_size}); the encoder has {have}; {works}"
        )


def dinov2_cache_path(name: str) -> Path:
    """Where `name` is cached: <torch.hub.get_dir()>/checkpoints/<url basename> (honours TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_CHECKPOINTS[name].filename


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks ("unreadable content (<reason>)" when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as err:
        return f"unreadable content ({_one_line(err)})"
    return h.hexdigest()


def _one_line(err: BaseException) -> str:
    """An exception as one short line (urllib reasons can be nested exceptions or multi-line)."""
    reason: Any = err if isinstance(err, HTTPError) else getattr(err, "reason", None) or err
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text[:300]


def _open(url: str, timeout: float) -> Any:
    """urlopen with a hard deadline on connecting, DNS lookup included (urlopen's timeout does not cover DNS)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["resp"] = urlopen(url, timeout=timeout)  # noqa: S310 - https URLs from the table (or tests)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, name="dinov2-download", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no connection within {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return box["resp"]


def _download(url: str, dst: Path, sha256: str, timeout: float, progress: bool) -> str | None:
    """Stream `url` to a temp file next to `dst`, check its SHA-256, rename into place; returns an error or None."""
    from tqdm import tqdm

    tmp: Path | None = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
        tmp = Path(tmp_name)
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar_args = dict(unit="B", unit_scale=True, unit_divisor=1024, desc=dst.name)
            with tqdm(total=total, disable=None if progress else True, **bar_args) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if total is not None and size != total:
            return f"download incomplete ({size} of {total} bytes)"
        got = h.hexdigest()
        if got != sha256:
            return f"checksum mismatch: SHA-256 {got} is not the published {sha256}, file refused and not cached"
        os.replace(tmp, dst)
        tmp = None
        return None
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError/HTTPError/timeouts are OSError
        return _one_line(err)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def fetch_dinov2(name: str, timeout: float | None = None, progress: bool = True) -> Path:
    """Path of the official checkpoint `name`: verified cache hit, else a verified download into the cache."""
    spec = DINOV2_CHECKPOINTS[name]
    dst = dinov2_cache_path(name)
    if dst.is_file():
        got = _sha256(dst)
        if got == spec.sha256:
            return dst
        raise PretrainedWeightsError(
            f"pretrained {name}: cached file {dst} does not match the published SHA-256 {spec.sha256} "
            f"(got {got}: corrupt or not the official file); delete it to download again, "
            f"or replace it by hand with {spec.url}"
        )
    error = _download(spec.url, dst, spec.sha256, DOWNLOAD_TIMEOUT if timeout is None else timeout, progress)
    if error is not None:
        raise PretrainedWeightsError(
            f"pretrained {name}: cannot download {spec.url} ({error}); download it by hand and place it at {dst}"
        )
    return dst
