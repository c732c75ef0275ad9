"""Errors that reach the user as one readable line (the CLI prints them without a traceback)."""


class FilterkitError(Exception):
    """A user-facing error: bad input, missing folder, malformed model directory..."""


class ImageError(FilterkitError):
    """An image that cannot be decoded; the message is the reason it was skipped."""
