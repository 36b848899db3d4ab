"""How a file-system path is stored as text, losslessly.

Linux names are bytes; Python gives a name that is not valid UTF-8 (Latin-1 from an old SMB client:
``b"caf\\xe9.png"``) as text with lone surrogates (``"caf\\udce9.png"``), which neither SQLite nor PostgreSQL
can store. So:

* :func:`path_text` is what the database holds for a path (``original_path``, ``stored_path``, claims): the
  path itself when it is valid UTF-8, else ``bytes:`` followed by its bytes with every backslash doubled and
  every byte that is not UTF-8 written ``\\xHH`` (``bytes:/srv/prediction/caf\\xe9.png``). A path as stored is
  absolute, so it never begins with ``bytes:`` itself (one that would is escaped too): the form is one to one,
  and :func:`text_path` gives the exact bytes back.
* :func:`display` is a name as shown to people and used for files histod names itself (the ``name`` column, the
  stored file in processed/ or failed/, log lines): the bytes that are not UTF-8 written ``\\xHH``, nothing else
  changed. It is readable but not one to one; the row's ``original_path`` is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "bytes:"
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def _valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_text(path: Path | str) -> str:
    """The stored form of ``path`` (see the module documentation)."""
    text = os.fspath(path)
    if _valid(text) and not text.startswith(PREFIX):
        return text
    raw = os.fsencode(text).replace(b"\\", b"\\\\")
    return PREFIX + raw.decode("utf-8", "backslashreplace")


def text_path(text: str) -> Path:
    """The path whose stored form is ``text`` (the inverse of :func:`path_text`)."""
    if not text.startswith(PREFIX):
        return Path(text)
    body = text[len(PREFIX) :]
    raw = bytearray()
    at = 0
    for match in _ESCAPE.finditer(body):
        raw += body[at : match.start()].encode("utf-8")
        code = match.group(1)
        raw += b"\\" if code == "\\" else bytes([int(code[1:], 16)])
        at = match.end()
    raw += body[at:].encode("utf-8")
    return Path(os.fsdecode(bytes(raw)))


def display(text: Path | str) -> str:
    """``text`` as valid UTF-8 for people and for names histod gives files: bytes that are not UTF-8 as ``\\xHH``."""
    value = os.fspath(text)
    if _valid(value):
        return value
    try:
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
