"""The error a user can fix: a wrong config value, a missing or damaged file, an unknown name.

The entry points print such an error as a short message (no traceback unless asked for) and exit
non-zero; everything else is a bug and keeps its traceback. Raise it (or a subclass) with a message
that names the culprit (key, file, value) and the fix.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the culprit and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what it should hold)."""
