"""User errors: bad input that is reported as one line and exit code 2, never a traceback.

Every package raises a subclass of :class:`UserError` for input it cannot use (config,
corpus, checkpoint, rank table, command-line argument); the command line catches the base
class once.  The message is the whole report: it names the input, what is wrong, and the fix.
"""

import contextlib
import os
import sys
from typing import Callable


class UserError(ValueError):
    """Bad user input; ``str(error)`` is one line naming the input, the problem and the fix."""


class DataError(UserError):
    """A corpus, manifest, checkpoint, output folder or argument that cannot be used."""


class Interrupted(Exception):
    """The user (or the cluster) asked the command to stop; it did so cleanly."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(message: str) -> str:
    """A message that stays one line even when it quotes a path or value holding line breaks."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def run_reporting_errors(prog: str, command: Callable[[], int]) -> int:
    """Run a command line's work; whatever escapes it becomes one line on stderr and an exit code:
    2 for bad input (a UserError, or a file-system refusal no check foresaw), 1 for an internal
    error (``PANGU_SIGMA_TRACEBACK=1`` re-raises it to show where), 130 for Ctrl-C."""
    try:
        return command()
    except UserError as err:
        print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if isinstance(err, BrokenPipeError) and err.filename is None:
            # stdout's reader left (`... | head`): not an error of ours; nothing more can be printed there
            with contextlib.suppress(OSError, ValueError):  # so that exit's flush cannot fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f"{err.filename}: " if err.filename else ""
        print(f"{prog}: error: {one_line(where + str(err.strerror or err))}; check the path, its permissions and "
              f"free space", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory; use a smaller model, batch or vocabulary", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback only on request
        if os.environ.get("PANGU_SIGMA_TRACEBACK"):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"{prog}: internal error: {type(err).__name__}: {first} (set PANGU_SIGMA_TRACEBACK=1 to see where; "
              f"please report it)", file=sys.stderr)
        return 1
