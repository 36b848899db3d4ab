"""Which names in the watched folder are images to take, in the style of watchfiles' ``DefaultFilter``.

A filter is a small callable: ``ImageFilter(extensions, ignore_patterns)(path) -> bool``. It looks at the
name only (never the file system), so it is cheap enough to run on every event and every reconcile entry.
:meth:`ImageFilter.in_tree` applies it to a path in a subfolder: folders are walked into whatever their name,
unless it matches an ignore pattern.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histod.settings import Settings

DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (".*", "*.part", "*.tmp", "~$*")
"""Hidden files, partial uploads and editor/office lock files."""


class ImageFilter:
    """Take names ending in one of ``extensions`` (any letter case) unless they match an ``ignore_patterns`` glob.

    Patterns are shell globs matched against the file name (not the folder), case-sensitively as on Linux:
    ``.*`` hides dot files, ``*.part`` / ``*.tmp`` hide uploads in progress, ``~$*`` hides Office lock files.
    Extensions are compared case-insensitively and may be given with or without the dot (``png``, ``.PNG``).
    """

    __slots__ = ("extensions", "ignore_patterns")

    def __init__(self, extensions: Iterable[str], ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS) -> None:
        exts = tuple(sorted({"." + e.lower().lstrip(".") for e in extensions if e.strip(". ")}))
        self.extensions: tuple[str, ...] = exts
        self.ignore_patterns: tuple[str, ...] = tuple(p for p in ignore_patterns if p)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFilter:
        return cls(settings.extensions, settings.ignore_patterns)

    def ignored(self, name: str) -> bool:
        """True when ``name`` matches one of the ignore patterns."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore_patterns)

    def in_tree(self, root: Path, path: Path) -> bool:
        """``path``, somewhere under ``root``, is taken: its name passes, and no folder between ``root`` and it
        matches an ignore pattern (a hidden folder is an upload in progress: nothing in it is taken)."""
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            return False
        return bool(parts) and not any(self.ignored(part) for part in parts[:-1]) and self(path)

    def __call__(self, path: Path) -> bool:
        name = path.name
        if not name or self.ignored(name):
            return False
        lowered = name.lower()
        return any(lowered.endswith(ext) and len(lowered) > len(ext) for ext in self.extensions)

    def __repr__(self) -> str:
        return f"ImageFilter(extensions={list(self.extensions)!r}, ignore_patterns={list(self.ignore_patterns)!r})"
