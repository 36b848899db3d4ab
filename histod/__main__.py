"""`python -m histod` and the `histod` command. SIGTERM is caught here, before anything heavy is imported, so
that `histod serve` stops cleanly whenever in its start-up it is asked to (histod.stopping)."""

from __future__ import annotations

from histod import stopping


def main() -> None:
    stopping.catch_early()
    from histod.cli import main as run

    run()


if __name__ == "__main__":
    main()
