"""The mistakes a user can make, and how every script reports them: in one line, not a traceback.

Each error below is raised with a message that names the file, entry or setting that is wrong
and the way out. A script's `__main__` runs through `run_script`, which turns them (and a full
disk) into `script.py: error: <message>` and exit status 1. Anything else is a bug of ours and
keeps its traceback.
"""
import errno
import os
import reprlib
import sys


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class DataError(UserError, ValueError):
    """A problem with the user's data; the message names the file, entry and path."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or folder that does not exist; the message says how to make it."""


class SettingsError(UserError, ValueError):
    """A setting that is unknown, of the wrong type or out of its range."""


class ModelError(UserError, ValueError):
    """A model name, config file or pretrained tag that does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, truncated, unsafe or of another model."""


class PretrainedUnavailable(UserError, RuntimeError):
    """Pretrained weights that cannot be downloaded here."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite losses in a row); the message says what to change."""


class OutputError(UserError, OSError):
    """An output that cannot be written: a folder without permission, a full disk, a run folder
    in use by another run."""


# Skipped items (an unreadable image, a missing file) are reported one way everywhere: the first
# few are named, all are counted.
SHOWN_SKIPPED = 5


def skipped_summary(messages):
    """Skipped items as results files record them: how many, and the first few."""
    return {"count": len(messages), "first": list(messages[:SHOWN_SKIPPED])}


def report_skipped(say, what, messages, total=None, named_before=0):
    """Name the skipped items `messages` through `say` (a logger's warning, or a print) while
    fewer than SHOWN_SKIPPED of this run or command are named (`named_before` were, earlier);
    then, when `total` is more than were named, say how many were skipped in all."""
    for message in messages[:max(0, SHOWN_SKIPPED - named_before)]:
        say(f"skipped {what}: {message}")
    if total is not None and total > min(SHOWN_SKIPPED, named_before + len(messages)):
        say(f"... {total} {what}s skipped in all")


# A message shows data read from a file through this: at most 3 levels deep and 4 items a level. The
# whole repr of untrusted data can be huge: a 286-byte pickle of lists nested 40 deep, each holding
# the next one twice, is a repr of 2^40 items, which exhausts memory before it could be cut.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = 60


def short_repr(value, limit=80):
    """The repr of a value read from a file, for a message: bounded before it is built."""
    try:
        text = _SHORT_REPR.repr(value)
    except ValueError:   # an int of more than 4300 digits, which Python refuses to write out
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_disk_full(error):
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(error, folder):
    return f"no space left on the disk of {folder} ({os.strerror(errno.ENOSPC)}); free some space " \
           f"or choose another folder, then run again"


def run_script(main, name):
    """Run a script's main(); report a user's mistake in one line and exit with status 1."""
    try:
        return main()
    except UserError as error:
        sys.exit(f"{name}: error: {error}")
    except OSError as error:
        if is_disk_full(error):
            sys.exit(f"{name}: error: {disk_full_message(error, error.filename or 'the output')}")
        raise
