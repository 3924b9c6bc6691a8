"""User errors: bad input that is reported as one line and exit code 2, never a traceback.

Every package raises a subclass of :class:`UserError` for input it cannot use (config,
corpus, checkpoint, rank table, command-line argument); the command line catches the base
class once.  The message is the whole report: it names the input, what is wrong, and the fix.
"""


class UserError(ValueError):
    """Bad user input; ``str(error)`` is one line naming the input, the problem and the fix."""


class DataError(UserError):
    """A corpus, manifest, checkpoint, output folder or argument that cannot be used."""
