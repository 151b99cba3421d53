"""The errors mebt reports to users. Each is one line that names the thing and the fix; the CLI prints it
and exits with status 2, never a traceback."""
from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input from the user (config, file, checkpoint); the CLI prints the one-line message and exits 2."""


class ConfigError(UserError):
    """A bad configuration value; the message is one line naming the key and the fix."""


class WriteError(UserError, OSError):
    """A file could not be written (a full disk, a read-only folder, a file where a folder should be): one
    line naming the path and the errno. Still an ``OSError``, so code that tolerates failed writes still does."""

    @classmethod
    def of(cls, path, e: OSError, blocker=None) -> "WriteError":
        import errno as errnos

        code = errnos.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        what = f"'{blocker}' is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        err = cls(f"cannot write '{path}': {what} ({code}); any previous file there is unchanged; free space, "
                  "fix the permissions or choose another path")
        err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)
        return err

    def __str__(self) -> str:   # the one line, not OSError's "[Errno N] ..." rendering
        return self.args[0]


class Interrupted(Exception):
    """A job stopped by Ctrl-C (or a stop signal) keeping what it finished; the message is the one line to
    print (empty when a worker printed it already), ``code`` the exit status (130: 128 + SIGINT)."""

    def __init__(self, line: str = "", code: int = 130):
        super().__init__(line)
        self.code = code


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch.load and PyAV errors span many lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def say(line: str) -> None:
    """Print one line to stderr in one write: the processes of a launch share one stderr, and ``print``'s
    separate write of the newline let two ranks' lines run together ("...pathmebt: error: ...")."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
