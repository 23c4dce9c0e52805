"""Command-line basics every script shares: boolean flags, the one-line config error, fail and warn."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator


def bool_flag(s: str) -> bool:
    """Parse boolean command-line values the way DINO does (``--use_fp16 false``)."""
    if s.lower() in {"off", "false", "0"}:
        return False
    if s.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (expected true/false)")


class ConfigError(ValueError):
    """A bad command-line value or combination of values; scripts report it as one line with exit code 2."""


@contextlib.contextmanager
def config_errors(context: str = "") -> Iterator[None]:
    """Report a ``ValueError`` raised inside as a :class:`ConfigError` (one line, exit code 2), its message
    prefixed with ``context`` (e.g. the flag whose value was parsed).

    Why: the project's builders and parsers (``parse_bands``, ``build_backbone``, ...) raise plain ValueErrors
    that name the flag; a script marks them as the user's configuration rather than a crash. A
    ``datasets.DataError`` (bad data on disk) and a ConfigError already say what they are and pass unchanged.
    """
    from datasets import DataError

    try:
        yield
    except (ConfigError, DataError):
        raise
    except ValueError as err:
        raise ConfigError(f"{context}: {err}" if context else str(err)) from None


def check_numbers(args: argparse.Namespace, positive: Iterable[str] = (), non_negative: Iterable[str] = ()) -> None:
    """Refuse a zero or negative value of a ``positive`` flag and a negative one of a ``non_negative`` flag (a
    list flag: any of its values), with one line naming the flag and its value (ConfigError)."""
    rules = ((positive, lambda v: v > 0, "a positive number"), (non_negative, lambda v: v >= 0, "a number >= 0"))
    for flags, holds, expected in rules:
        for flag in flags:
            value = getattr(args, flag)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is not None and not holds(v) for v in values):  # NaN holds no comparison: refused too
                shown = " ".join(map(str, values))
                raise ConfigError(f"--{flag} {shown}: expected {expected}")


def one_line(err: BaseException) -> str:
    """The message of an error as one line, also when it was re-raised from a DataLoader worker.

    Worker errors arrive as "Caught DataError in DataLoader worker ... Original Traceback ...": the last
    line holds the original message, prefixed with the exception's qualified name, which is dropped here.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    for name in ("datasets.DataError: ", "DataError: ", "ValueError: ", "cli.ConfigError: "):
        last = last.removeprefix(name)
    return last


def key_mismatch(expected: Iterable[str], found: Iterable[str], shown: int = 3) -> str:
    """How two sets of state-dict keys differ, in one short line: counts and the first few of each side.

    Why: torch's own message lists every key of the network (kilobytes for a ViT), which hides the cause.
    """
    expected, found = list(expected), list(found)
    missing = [k for k in expected if k not in set(found)]
    unexpected = [k for k in found if k not in set(expected)]
    parts = []
    for count_name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = ", ..." if len(keys) > shown else ""
            parts.append(f"{len(keys)} {count_name} (first: {', '.join(keys[:shown])}{more})")
    return "; ".join(parts) or "no key differs"


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit (code 2: bad arguments or bad input data)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def warn(message: str) -> None:
    """Print one warning line on stderr (the run goes on)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
