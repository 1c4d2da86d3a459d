"""Errors a user can cause and fix."""


class UserError(ValueError):
    """A bad file, flag or request. The CLI prints it without a traceback and exits with status 2."""
