"""The `histod` command: parse, build Settings, call domain code, map its errors to messages and exit codes.

Commands live in histod.commands_*; each is a few lines that hand over to trainer/, daemon/ or db/.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from histod import __version__, stopping
from histod.errors import HistodError
from histod.logs import capture_stderr, configure, json_mode, problem, reset
from histod.settings import load_settings


class _Group(click.Group):
    """Turns every HistodError into `error: <message>` on stderr (an ``error`` event in JSON mode) and the
    error's exit code: never a traceback. The message is one line, with control characters escaped (it may
    quote a file name)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HistodError as exc:
            problem(str(exc), exit_code=exc.exit_code)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="histod")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="default: HISTOD_LOG_LEVEL or info",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default=None,
    help="auto: coloured on a terminal, JSON lines otherwise",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """histod: classify histopathology images as Benign or Malignant.

    A research tool, not a medical device: every result needs a pathologist's review.
    """
    if ctx.invoked_subcommand not in stopping.CLEAN_STOP_COMMANDS:
        stopping.release()  # SIGTERM ends this command by its default action, as before
    reset()  # a settings error is reported before logging is configured
    settings = load_settings(log_level=log_level, log_format=log_format)
    # JSON lines: what native libraries and Python itself write to stderr becomes JSON events as well
    stream = capture_stderr() if json_mode(settings.log_format) else None
    configure(settings.log_level, settings.log_format, stream=stream)
    ctx.obj = {"log_level": log_level, "log_format": log_format}


def _register() -> None:
    from histod import commands_audit, commands_report, commands_service, commands_trainer

    for module in (commands_trainer, commands_service, commands_report, commands_audit):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="histod")
