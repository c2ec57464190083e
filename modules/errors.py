"""Errors the user can fix; the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, data); the message says what to change."""

    exit_code = 2


class RunError(Exception):
    """A run that cannot go on (e.g. NaN loss); the message names the step and the way forward."""

    exit_code = 1
