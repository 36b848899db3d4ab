"""`histod serve`, `histod report`, `histod results`, `histod demo`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
