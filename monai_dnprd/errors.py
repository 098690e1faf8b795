"""One-line errors on the command line: a refusal prints ``error: <file or option>: <reason>`` and exits 1.

``python -m monai.bundle run`` shows any error as a long traceback that ends in MONAI's generic
"Failed to evaluate ConfigExpression"; the real reason is a chained exception deep inside. The bundle configs
call ``install_error_hook()`` first in their ``initialize`` list: from then on an uncaught exception prints one
line on stderr, the reason that matters (the outermost exception of the chain that is not one of MONAI's
generic wrappers), with the ``--option`` whose value it names, and Python exits with status 1 as usual.
``MONAI_DNPRD_DEBUG=1`` (or ``--debug true`` on the command line) keeps the full traceback.

Errors raised before the configs' ``initialize`` runs (a config file that cannot be read or parsed) are
MONAI's own and keep their traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "DEBUG_ENV",
    "install_error_hook",
    "format_error",
    "root_cause",
    "exception_chain",
    "debug_requested",
    "is_bundle_cli",
]

DEBUG_ENV = "MONAI_DNPRD_DEBUG"
# MONAI's wrappers that only say where an error happened (config expression, component, transform)
WRAPPER_PREFIXES = ("Failed to evaluate", "Failed to instantiate", "applying transform")
FOREIGN_MAX_CHARS = 300  # messages of other libraries can be whole paragraphs
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
_TRUE = {"1", "true", "yes", "on"}
_TYPE_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Warning)\w*: ")


def is_bundle_cli(argv: Sequence[str]) -> bool:
    """True when ``argv`` is that of ``python -m monai.bundle`` (not an in-process workflow or a notebook)."""
    return bool(argv) and Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py")


def _cli_options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(key, value)`` of the ``--key value`` / ``--key=value`` pairs of a command line (value None for a bare flag)."""
    out: list[tuple[str, str | None]] = []
    for i, tok in enumerate(argv):
        if not tok.startswith("--") or len(tok) < 3:
            continue
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            out.append((key, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((tok[2:], argv[i + 1]))
        else:
            out.append((tok[2:], None))
    return out


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when the user asked for full tracebacks: ``MONAI_DNPRD_DEBUG=1`` or ``--debug [true]`` on the command line."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in _TRUE:
        return True
    for key, value in _cli_options(sys.argv if argv is None else argv):
        if key == "debug":
            return value is None or value.strip().lower() in _TRUE
    return False


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else an unsuppressed ``__context__``), outermost first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    return chain


def _is_wrapper(exc: BaseException) -> bool:
    """True for MONAI's generic wrappers, which add where an error happened but not why."""
    has_inner = exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__)
    return has_inner and str(exc).lstrip().startswith(WRAPPER_PREFIXES)


def root_cause(exc: BaseException) -> BaseException:
    """The exception that says what went wrong: the outermost one in the chain that is not a generic wrapper.

    Not simply the innermost: an error of this package often names the file and wraps a lower-level one (an
    ``OSError`` without the context) as its cause.
    """
    chain = exception_chain(exc)
    for candidate in chain:
        if not _is_wrapper(candidate):
            return candidate
    return chain[-1]


def _raised_here(exc: BaseException) -> bool:
    """True if ``exc`` was raised by this package's code (its messages are written to be read as they are)."""
    if type(exc).__module__.split(".")[0] == __name__.split(".")[0]:
        return True
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _one_line(text: str, limit: int | None) -> str:
    """A message on one line: the last line of an embedded traceback, else all lines joined; cut at ``limit``."""
    if "Traceback (most recent call last)" in text:  # e.g. an error re-raised from a DataLoader worker
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _same_path(a: str, b: str) -> bool:
    """True if two path strings name the same path (textually, after normalisation; nothing is read)."""
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def _name_option(message: str, argv: Sequence[str]) -> str:
    """Prefix ``--key`` to a message about the value of a command-line option (a path, or a quoted value)."""
    if re.search(r"(^|[\s(])--\w", message):
        return message  # the message names its option already
    head = message.split(": ", 1)[0] if ": " in message else None
    skip = {"config_file", "meta_file", "logging_file", "bundle_root", "args_file"}
    options = [(key, value) for key, value in _cli_options(argv) if value and key not in skip]
    for key, value in options:  # "<path>: <reason>" about the path an option gave
        if head is not None and _same_path(head, value):
            return f"--{key} {message}"
    for key, value in options:  # "... got 'maybe'" about an option's value
        if f"'{value}'" in message or f'"{value}"' in message:
            return f"--{key} {value}: {message}"
    return message


def format_error(exc: BaseException, argv: Sequence[str] = ()) -> str:
    """The one line shown for an uncaught ``exc``: ``error: <reason>``, with the type when the message alone is unclear."""
    cause = root_cause(exc)
    if isinstance(cause, KeyboardInterrupt):
        return "error: interrupted"
    ours = _raised_here(cause)
    message = _one_line(str(cause), None if ours else FOREIGN_MAX_CHARS)
    # a sentence of a ValueError/RuntimeError/OSError speaks for itself; "'image'" of a KeyError does not
    clear = isinstance(cause, (ValueError, RuntimeError, OSError)) and len(message.split()) >= 3
    if not clear and not _TYPE_LINE.match(message):
        message = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    message = _name_option(message, argv)
    # a refusal of this package is the whole story; anything else may be a bug worth its traceback
    hint = "" if ours and clear else f" (set {DEBUG_ENV}=1 to see the traceback)"
    return f"error: {message}{hint}"


def install_error_hook(argv: Sequence[str] | None = None, force: bool = False) -> bool:
    """Make uncaught errors of the ``monai.bundle`` command line one line on stderr (exit status 1), unless debugging.

    Called first in the bundle configs' ``initialize`` lists. It changes nothing in other processes (tests,
    notebooks running a workflow in-process) unless ``force``; returns whether the hook is in place.
    """
    argv = list(sys.argv if argv is None else argv)
    if not (force or is_bundle_cli(argv)) or debug_requested(argv):
        return False
    if getattr(sys.excepthook, "_monai_dnprd_hook", False):
        return True
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        """Print the one-line error (the full traceback when debugging is asked for or formatting fails)."""
        if debug_requested(argv):
            previous(exc_type, exc, tb)
            return
        try:
            line = format_error(exc, argv)
        except Exception:  # noqa: BLE001 - never hide the original error behind a bug of this hook
            previous(exc_type, exc, tb)
            return
        print(line, file=sys.stderr, flush=True)

    hook._monai_dnprd_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True
