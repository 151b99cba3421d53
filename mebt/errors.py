"""The errors mebt reports to users. Each is one line that names the thing and the fix; the CLI prints it
and exits with status 2, never a traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (config, file, checkpoint); the CLI prints the one-line message and exits 2."""


class ConfigError(UserError):
    """A bad configuration value; the message is one line naming the key and the fix."""


class Interrupted(Exception):
    """A job stopped by Ctrl-C (or a stop signal) keeping what it finished; the message is the one line to
    print (empty when a worker printed it already), ``code`` the exit status (130: 128 + SIGINT)."""

    def __init__(self, line: str = "", code: int = 130):
        super().__init__(line)
        self.code = code


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch.load and PyAV errors span many lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
