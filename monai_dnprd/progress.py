"""Progress of the long steps (preprocessing, validation, calibration, statistics): one helper used everywhere.

On an interactive terminal (stderr is a TTY) a step shows a tqdm bar with its rate and ETA. Elsewhere (log
files, pipes) a redrawn bar is noise, so a step logs one line when it starts, one at most every ``log_every``
seconds while it runs (with its ETA), and one when it ends, with its duration. Under torchrun only rank 0
reports. The end line is logged in both modes, so that a log always says how long each step took.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "progress", "interactive", "format_seconds"]

logger = logging.getLogger("monai_dnprd")

T = TypeVar("T")


def interactive(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is a terminal with a width: the rule of
    ``engines.ProgressBar``, less the zero-width ptys of some job runners (a bar there shows nothing)."""
    stream = sys.stderr if stream is None else stream
    try:
        if not stream.isatty():
            return False
        return os.get_terminal_size(stream.fileno()).columns > 0  # a pty of width 0 would show an empty bar
    except (AttributeError, ValueError, OSError):  # no isatty/fileno, a closed stream, no size
        return False


def format_seconds(seconds: float) -> str:
    """A duration for log lines: ``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise); imported late to keep this module light."""
    from monai_dnprd.distributed import rank

    return rank()


class Progress:
    """One long step of ``total`` units: call ``update`` after each unit is done, ``close`` (or leave the
    ``with`` block) at the end; a bar on a TTY, start/periodic/end log lines otherwise.

    ``counts`` given to ``update`` (e.g. ``cached=1``) add up and are shown in the bar and the end line.
    ``bar`` forces the bar on (True) or off (False); ``enabled=False`` reports nothing at all.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", bar: bool | None = None,
                 log_every: float = 60.0, enabled: bool = True, log: logging.Logger | None = None) -> None:
        self.desc = desc
        self.total = None if total is None else int(total)
        self.unit = unit
        self.log_every = float(log_every)
        self.log = log or logger
        self.n = 0
        self.counts: dict[str, int] = {}
        self.start = time.perf_counter()
        self._last_log = self.start
        self._closed = False
        self._bar = None
        self.enabled = bool(enabled) and _rank() == 0
        if not self.enabled:
            return
        if interactive() if bar is None else bar:
            from tqdm.auto import tqdm

            nested = bool(getattr(tqdm, "_instances", ()))  # inside another bar (training): vanish when done
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             leave=not nested)
        else:
            self.log.info("%s: started%s", desc, "" if self.total is None else f" ({self.total} {unit})")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far; None without a total or before the first unit."""
        if self.total is None or self.n <= 0:
            return None
        return self.elapsed / self.n * max(self.total - self.n, 0)

    def _counts_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts.items())

    def update(self, n: int = 1, **counts: int) -> None:
        """``n`` more units done; ``counts`` are added to the named tallies."""
        self.n += n
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        if not self.enabled or self._closed:
            return
        if self._bar is not None:
            if counts:
                self._bar.set_postfix_str(self._counts_text(), refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.log_every > 0 and now - self._last_log >= self.log_every:
            self._last_log = now
            eta = self.eta()
            of = "" if self.total is None else f"/{self.total}"
            self.log.info("%s: %d%s %s, %s elapsed%s", self.desc, self.n, of, self.unit, format_seconds(self.elapsed),
                          "" if eta is None else f", about {format_seconds(eta)} left")

    def close(self, failed: bool = False) -> None:
        """End the step (idempotent): close the bar and log how many units it did, in how long."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        counts = self._counts_text()
        self.log.info("%s: %s%d %s in %s%s", self.desc, "stopped after " if failed else "", self.n, self.unit,
                      format_seconds(self.elapsed), f" ({counts})" if counts else "")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             bar: bool | None = None, enabled: bool = True) -> Iterator[T]:
    """Yield the items of ``iterable`` while reporting progress (``Progress``); a unit counts as done when the
    consumer asks for the next item, so the rate and ETA include the consumer's work."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    p = Progress(desc, total, unit, bar=bar, enabled=enabled)
    failed = True
    try:
        for item in iterable:
            yield item
            p.update()
        failed = False
    finally:
        p.close(failed=failed and p.n != p.total)
