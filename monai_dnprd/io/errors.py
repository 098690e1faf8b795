"""Error type for one unusable input volume, so workflows can report it and go on with the others."""

from __future__ import annotations

import os


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so a message stays on one line."""
    return " ".join(str(text).split())


class VolumeError(ValueError):
    """One input volume cannot be used; str(err) == f"{path}: {reason}" on one line."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        """Keep the offending path and a short human-readable reason."""
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.reason = _one_line(reason)
        shown = self.path.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{shown}: {self.reason}")

    def __reduce__(self):
        """Pickle by (path, reason) so the error survives DataLoader worker processes."""
        return (type(self), (self.path, self.reason))


def find_volume_error(exc: BaseException | None) -> VolumeError | None:
    """Return the VolumeError behind `exc` (MONAI's Compose wraps transform errors in RuntimeError), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, VolumeError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
