"""`histod audit verify|export|review` and `histod explain`: thin commands over histod.db.chain, histod.db.audit
and histod.trainer.explain. verify, export and explain open the database read-only and never migrate;
review writes one new row (the database must already be at the current schema)."""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from histod.commands_service import _open, _settings, common, parse_when


@click.group()
def audit() -> None:
    """Check, export and amend the audit trail (the results hash chain)."""


@audit.command()
@common
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="HASH",
    help="a chain hash published earlier (an export manifest's last_hash) that must still be in the chain",
)
def verify(anchors: tuple[str, ...], **flags: Any) -> None:
    """Recompute the hash chain; report the first broken or missing link and exit 1 when there is one."""
    from histod.db.chain import verify as walk
    from histod.db.session import reading

    with reading(_open(_settings(**flags))) as session:
        verdict = walk(session, anchors=tuple(a.strip().lower() for a in anchors))
    if verdict.ok:
        click.echo(f"ok: {verdict.rows} results, chain intact; {verdict.models} models rows intact")
        click.echo(f"first hash {verdict.first_hash or '-'}")
        click.echo(f"last hash  {verdict.last_hash or '-'}")
        return
    click.echo(f"BROKEN: {verdict.broken}", err=True)
    click.echo(f"({verdict.rows} results checked, up to and including the break)", err=True)
    sys.exit(1)


@audit.command()
@common
@click.option("--since", default=None, help="a duration (24h, 7d) or an ISO date/time; default: everything")
@click.option("--until", default=None)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="FILE.csv or FILE.json")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default=None, help="default: from --out")
def export(since: str | None, until: str | None, out: Path, fmt: str | None, **flags: Any) -> None:
    """Write the result rows (with their chain hashes) and OUT.manifest.json."""
    from histod.db.audit import export as write
    from histod.db.audit import export_format
    from histod.db.session import reading

    now = datetime.now(UTC)
    chosen = export_format(out, fmt)
    with reading(_open(_settings(**flags))) as session:
        done = write(
            session,
            out,
            fmt=chosen,
            since=parse_when(since, now) if since else None,
            until=parse_when(until, now) if until else None,
        )
    click.echo(f"{done.rows} rows -> {done.path} (sha256 {done.sha256})")
    click.echo(f"manifest -> {done.manifest}")


@audit.command()
@common
@click.argument("result_id", type=int)
@click.option("--label", required=True, help="the reviewer's call: Benign or Malignant")
@click.option("--reviewer", required=True, help="who reviewed it")
@click.option("--note", default=None)
def review(result_id: int, label: str, reviewer: str, note: str | None, **flags: Any) -> None:
    """Record a reviewer's call on RESULT_ID as a new row that amends it (the original row is kept)."""
    from histod.db.queries import add_review
    from histod.db.session import check_schema, open_database, transaction

    settings = _settings(**flags)
    factory = open_database(
        settings.resolved_database_url, migrate=False, must_exist=True, busy_timeout_ms=settings.busy_timeout_ms
    )
    check_schema(factory.kw["bind"])  # a reviewer never migrates either
    with transaction(factory) as session:
        row = add_review(session, result_id, label=label, reviewer=reviewer, note=note, host=socket.gethostname())
        click.echo(f"result {row.id}: review of {result_id} by {row.reviewer}: {row.label} (hash {row.row_hash})")


@click.command()
@common
@click.argument("result_id", type=int)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="default: explain-ID.png")
@click.option(
    "--target",
    type=click.Choice(["predicted", "malignant", "benign"]),
    default="predicted",
    show_default=True,
    help="the class whose evidence is mapped",
)
@click.option("--min-size", type=click.IntRange(min=1), default=256, show_default=True, help="shorter side, px")
def explain(result_id: int, out: Path | None, target: str, min_size: int, **flags: Any) -> None:
    """A Grad-CAM heat map of the image behind RESULT_ID, overlaid on it, as PNG (loads TensorFlow)."""
    from histod.db.audit import subject
    from histod.db.session import reading

    with reading(_open(_settings(**flags))) as session:
        found = subject(session, result_id)
    result, model = found.result, found.model
    if target == "predicted":
        target = "malignant" if (result.label or "").lower() == "malignant" else "benign"
    from histod.trainer.explain import explain_file

    path, p, size = explain_file(
        Path(model.run_path),
        found.image,
        out or Path(f"explain-{result.id}.png"),
        target=target,
        expected_sha256=model.sha256,
        min_size=min_size,
    )
    click.echo(
        f"{path}: Grad-CAM ({target}) of result {result.id} ({found.image}), {size[0]}x{size[1]} px; "
        f"recorded p={result.p_malignant:.4f} {result.label}, Keras p={p:.4f}, model {model.run_path}"
    )


COMMANDS: list[click.Command] = [audit, explain]
