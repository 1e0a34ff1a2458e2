"""The one exception preprocessing raises for bad input."""

from __future__ import annotations


class VideoDecodeError(ValueError):
    """The input cannot be turned into model input; the message says why, in plain words.

    Raised for empty or unrecognisable bytes, files without a video stream, truncated or corrupt
    data, inputs over the configured `Limits`, and still images passed without `image=True`.
    Messages never contain file paths or decoder internals, so they are safe to return to clients.
    """
