"""Errors a user can fix; the CLI prints them in one line instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration. The message names the file, line or field to fix."""
