"""One kind of error for a person's mistake, and the command-line wrapper that reports it."""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A mistake in what the user asked for: printed as one paragraph, exit status 2, no traceback."""


def _exit(code: int, as_script: bool):
    """Exit with `code`. A script ends at once: after an error, background readers (orbax's
    asyncio tasks on a damaged checkpoint, say) would otherwise print their own tracebacks
    while the interpreter shuts down. Called in-process (tests), it raises SystemExit."""
    sys.stdout.flush()
    sys.stderr.flush()
    if as_script:
        os._exit(code)
    sys.exit(code)


def cli(main):
    """Run `main`, turning a UserError (or Ctrl-C before training starts) into a message and an exit code.

    `as_script` says whether the call is a program's whole run (`python -m gptjax.x`, train.py, the
    `gptjax` command), which an error then ends at once. It defaults to whether `main` is in the
    module Python started with; a program that runs `main` from another module passes it.
    """

    @functools.wraps(main)
    def wrapper(*args, as_script: bool | None = None, **kwargs):
        if as_script is None:
            as_script = main.__module__ == "__main__"
        # A script holds back "Exception ignored in ..." reports (finalizers that fail, such as the
        # coroutines of an orbax read abandoned on a damaged checkpoint) until it ends normally; after
        # a user error they are noise, and they would interleave with the message.
        held, report = [], sys.unraisablehook
        if as_script:
            sys.unraisablehook = held.append
        try:
            result = main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            _exit(2, as_script)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            _exit(130, as_script)
        except SystemExit:
            _report(held, report)
            raise
        _report(held, report)
        return result

    return wrapper


def _report(held: list, report) -> None:
    sys.unraisablehook = report
    if _noise:
        _filter()
    for unraisable in held:
        sys.unraisablehook(unraisable)


_noise: list = []  # predicates of "Exception ignored" reports known to be harmless: dropped from then on


def drop_unraisable(predicate) -> None:
    """Drop from now on, in this process, the unraisable errors for which `predicate(report)` is true: those
    a caller knows to be harmless leftovers (of an abandoned read, say), which would print a traceback."""
    if predicate not in _noise:
        _noise.append(predicate)
    _filter()


def _filter() -> None:
    inner = sys.unraisablehook
    if getattr(inner, "drops_noise", False):
        return

    def hook(report):
        if not any(p(report) for p in _noise):
            inner(report)

    hook.drops_noise = True
    sys.unraisablehook = hook
