"""The errors mebt reports to users. Each is one line that names the thing and the fix; the CLI prints it
and exits with status 2, never a traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (config, file, checkpoint); the CLI prints the one-line message and exits 2."""


class ConfigError(UserError):
    """A bad configuration value; the message is one line naming the key and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch.load and PyAV errors span many lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
