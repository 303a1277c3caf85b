"""The error type datd raises for bad input and unreadable files.

Every reader of our artifacts (statistics, compressed models, plans, latency caches, weights files) raises
``DatdError`` and nothing else, whatever bytes it is given; the command line prints its message as one line
(``--debug``: with the traceback). It subclasses ValueError, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class DatdError(ValueError):
    """Bad input or an unreadable file, explained in one line."""


class MissingFileError(DatdError, FileNotFoundError):
    """A path that should exist does not."""


@contextmanager
def reading(what: object) -> Iterator[None]:
    """Turn any failure while parsing ``what`` into one DatdError: the last line of defence of every reader,
    so that no bytes, however mangled, end in a crash (the safetensors parser panics on some: a BaseException)."""
    try:
        yield
    except DatdError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a reader must say "cannot read", whatever broke
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatdError(f"cannot read {what}: {detail}") from exc
