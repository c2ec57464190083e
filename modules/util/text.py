"""Text for people: file names as they can always be printed."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with what a UTF-8 stream cannot encode written as escapes.

    File names that are not UTF-8 reach Python as lone surrogates (PEP 383); printed as they
    are, they crash a strict UTF-8 stdout. Their bytes are shown as \\xNN escapes instead.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that stand for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
