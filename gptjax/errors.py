"""One kind of error for a person's mistake, and the command-line wrapper that reports it."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in what the user asked for: printed as one paragraph, exit status 2, no traceback."""


def cli(main):
    """Run `main`, turning a UserError (or Ctrl-C before training starts) into a message and an exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
