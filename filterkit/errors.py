"""Errors that reach the user as one readable line (the CLI prints them without a traceback)."""


class FilterkitError(Exception):
    """A user-facing error: bad input, missing folder, malformed model directory..."""


class ImageError(FilterkitError):
    """An image that cannot be decoded; the message is the reason it was skipped."""


class ImageReadError(ImageError):
    """The file's bytes could not be read (missing, no permission): unlike a decode failure,
    this says nothing about the content, so it is not remembered against it."""


class WorkerDied(FilterkitError):
    """A decode worker process died under a running command (killed: most often for memory)."""
