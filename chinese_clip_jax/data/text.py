"""The one way a text file of the user's is decoded: captions, tables, text corpora, image lists,
labels and templates all come through here.

    for n, line in decoded_lines(path, encoding="utf-8", what="--texts"):  # n: the 1-based line
        ...

UTF-8 by default, with or without a BOM (Windows editors write one: it is no part of the first
record); ``encoding`` names another (``gbk``, ``gb18030``, ...), given by the ``--encoding``
option of each command (``data.encoding`` in training). A line that does not decode stops the
read with a one-line ``TextDecodeError`` naming the file, the line, the byte and, when the
bytes read as GBK, that guess (``io.decode_failure``); an encoding Python does not know is a
one-line error before anything is read. A file in another encoding is the wrong input, not bad
records to skip one by one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from ..io import as_path, decode_failure

__all__ = ["TextDecodeError", "check_encoding", "decoded_lines", "read_text", "decode_bytes"]

DEFAULT_ENCODING = "utf-8"


class TextDecodeError(ValueError):
    """A text file that is not in the expected encoding (or an unknown encoding); one line."""


def check_encoding(encoding: str, *, retry: str | None = "--encoding") -> str:
    """``encoding`` if Python knows it; a one-line TextDecodeError naming ``retry`` otherwise."""
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise TextDecodeError(f"{retry or 'encoding'} {encoding!r}: unknown text encoding") from None
    return encoding


def _first_line_codec(encoding: str) -> str:
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding  # -sig: drops a BOM


def decoded_lines(
    path, *, encoding: str = DEFAULT_ENCODING, what: str | None = None, retry: str | None = "--encoding"
) -> Iterator[tuple[int, str]]:
    """Yields (line number from 1, the line's text without its line break) of a local or remote
    (epath) text file, blank lines included. ``what`` prefixes the error (e.g. ``--labels``);
    ``retry``: the option that names the encoding in the error's advice."""
    check_encoding(encoding, retry=retry)
    first = _first_line_codec(encoding)
    p = as_path(path)
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(first if n == 1 else encoding)
            except UnicodeDecodeError as e:
                where = f"{what} {path}:{n}" if what else f"{path}:{n}"
                raise TextDecodeError(decode_failure(where, raw, e, encoding, retry)) from None
            yield n, line.rstrip("\r\n")


def read_text(
    path, *, encoding: str = DEFAULT_ENCODING, what: str | None = None, retry: str | None = "--encoding"
) -> str:
    """The whole file as text (``decoded_lines`` joined with "\\n"): a table's CSV reader needs it
    whole, and a bad byte is still named by its line."""
    return "".join(line + "\n" for _, line in decoded_lines(path, encoding=encoding, what=what, retry=retry))


def decode_bytes(data: bytes, *, where: str, encoding: str = DEFAULT_ENCODING, retry: str | None = "--encoding") -> str:
    """One text held whole in bytes (a webdataset caption member), decoded as a file's first line:
    a UTF-8 BOM dropped; a one-line TextDecodeError naming ``where`` (e.g. ``shard.tar:key.txt``)."""
    try:
        return data.decode(_first_line_codec(encoding))
    except UnicodeDecodeError as e:
        raise TextDecodeError(decode_failure(where, data, e, encoding, retry)) from None
