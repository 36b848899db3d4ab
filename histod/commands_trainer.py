"""`histod train`, `histod evaluate`, `histod predict`. TensorFlow is imported inside the commands only."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
