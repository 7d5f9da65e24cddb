"""The error a user can fix: a wrong config value, a missing or damaged file, an unknown name.

The entry points print such an error as a short message (no traceback unless asked for) and exit
non-zero; everything else is a bug and keeps its traceback. Raise it (or a subclass) with a message
that names the culprit (key, file, value) and the fix.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the culprit and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what it should hold)."""


def check_writable_folder(folder, culprit: str, what: str = "") -> None:
    """Make `folder` (and its parents) and write a probe file in it, before any work whose results go
    there; a `UserError` "<culprit>: cannot write <what>there (<cause>)" otherwise."""
    import tempfile
    from pathlib import Path

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check"):
            pass
    except OSError as e:
        raise UserError(f"{culprit}: cannot write {what}there ({e.strerror or e})") from None


def error_chain(err: BaseException):
    """`err`, then the errors it was raised from or while handling (``__cause__``, else ``__context__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
