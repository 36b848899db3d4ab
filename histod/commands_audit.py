"""`histod audit verify|export|review|keygen` and `histod explain`: thin commands over histod.db.chain,
histod.db.verify, histod.db.audit and histod.trainer.explain. verify, export and explain open the database
read-only and never migrate; review writes one new row (the database must already be at the current schema)."""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from histod.commands_report import open_reader
from histod.commands_service import database_options, parse_when, settings_from
from histod.logs import is_json, problem


@click.group()
def audit() -> None:
    """Check, export and amend the audit trail (one hash chain over results, moves, reports and models)."""


@audit.command()
@database_options
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="HASH",
    help="a chain hash published earlier (an export manifest's last_hash) that must still be in the chain",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="the audit key: also check every row's MAC (default: the audit_key_file setting)",
)
@click.option("--no-key", is_flag=True, help="check the plain hash chain only, even where a key is configured")
def verify(anchors: tuple[str, ...], key_file: Path | None, no_key: bool, **flags: Any) -> None:
    """Walk the audit chain (results, moves, reports, models); report the first broken or missing link and exit 1
    when there is one."""
    from histod.db.chain import load_key
    from histod.db.session import reading
    from histod.db.verify import verify as walk

    settings = settings_from(**flags)
    key = None if no_key else load_key(key_file or settings.audit_key_file)
    with reading(open_reader(settings)) as session:
        verdict = walk(session, anchors=tuple(a.strip().lower() for a in anchors), key=key)
    counts = verdict.counts
    if verdict.ok:
        click.echo(
            f"ok: {counts['results']} results, chain intact; in the same chain {counts['moves']} moves, "
            f"{counts['reports']} reports, {counts['models']} models, {counts['tiles']} tile sets "
            f"({verdict.total} rows)"
        )
        click.echo(f"first hash {verdict.first_hash or '-'}")
        click.echo(f"last hash  {verdict.last_hash or '-'}")
        if verdict.key_checked and verdict.total:
            click.echo(
                f"keyed: intact under the key; the last row's MAC vouches for all {verdict.total} rows "
                f"({verdict.keyed} carry a MAC)"
            )
        elif verdict.keyed:
            click.echo(f"keyed: {verdict.keyed} of {verdict.total} rows carry a MAC, not checked (no key given)")
        return
    if is_json():  # one event, so that the log stream stays JSON
        problem(str(verdict.broken), event="audit.broken", rows_checked=verdict.total)
    else:
        click.echo(f"BROKEN: {verdict.broken}", err=True)
        click.echo(f"({verdict.total} rows checked, up to and including the break)", err=True)
    sys.exit(1)


@audit.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def keygen(path: Path) -> None:
    """Write a new audit key to PATH (mode 0600; never over an existing file). Point audit_key_file at it and run
    the service as the key's owner: every row it appends then carries a MAC that `audit verify` checks."""
    from histod.db.chain import write_key

    write_key(path)
    click.echo(f"key -> {path} (mode 0600): keep a copy somewhere safe; rows keyed with it need it to verify")


@audit.command()
@database_options
@click.argument("out", metavar="FILE", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--since", default=None, help="a duration (24h, 7d) or an ISO date/time; default: everything")
@click.option("--until", default=None)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default=None, help="default: from FILE's suffix")
def export(out: Path, since: str | None, until: str | None, fmt: str | None, **flags: Any) -> None:
    """Write the result rows (with their chain hashes) to FILE (.csv or .json) and FILE.manifest.json."""
    from histod.db.audit import export as write
    from histod.db.audit import export_format
    from histod.db.session import reading

    now = datetime.now(UTC)
    chosen = export_format(out, fmt)
    with reading(open_reader(settings_from(**flags))) as session:
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
@database_options
@click.argument("result_id", type=int)
@click.option("--label", required=True, help="the reviewer's call: Benign or Malignant")
@click.option("--reviewer", required=True, help="who reviewed it")
@click.option("--note", default=None)
def review(result_id: int, label: str, reviewer: str, note: str | None, **flags: Any) -> None:
    """Record a reviewer's call on RESULT_ID as a new row that amends it (the original row is kept)."""
    from histod.db.chain import load_key, use_key
    from histod.db.queries import add_review
    from histod.db.session import check_schema, open_database, transaction

    settings = settings_from(**flags)
    key = load_key(settings.audit_key_file)
    factory = open_database(
        settings.resolved_database_url, migrate=False, must_exist=True, busy_timeout_ms=settings.busy_timeout_ms
    )
    check_schema(factory.kw["bind"])  # a reviewer never migrates either
    use_key(factory, key)
    with transaction(factory) as session:
        row = add_review(session, result_id, label=label, reviewer=reviewer, note=note, host=socket.gethostname())
        click.echo(f"result {row.id}: review of {result_id} by {row.reviewer}: {row.label} (hash {row.row_hash})")


@click.command()
@database_options
@click.argument("result_id", type=int)
@click.option(
    "--png", "out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="default: explain-ID.png"
)
@click.option(
    "--target",
    type=click.Choice(["predicted", "malignant", "benign"]),
    default="predicted",
    show_default=True,
    help="the class whose evidence is mapped",
)
@click.option("--min-size", type=click.IntRange(min=1), default=256, show_default=True, help="shorter side, px")
def explain(result_id: int, out: Path | None, target: str, min_size: int, **flags: Any) -> None:
    """A Grad-CAM heat map of the image behind RESULT_ID, overlaid on it, as PNG (loads TensorFlow). The image
    is explained as one tile at the model's input, as the service classified it; an image much larger than the
    model's training tiles is explained all the same, with a warning saying so."""
    from histod.db.audit import subject
    from histod.db.session import reading
    from histod.trainer import require_training

    require_training("histod explain")
    with reading(open_reader(settings_from(**flags))) as session:
        found = subject(session, result_id)
    result, model = found.result, found.model
    if target == "predicted":
        target = "malignant" if (result.label or "").lower() == "malignant" else "benign"
    from histod.trainer.explain import explain_file

    path, p, size, warnings = explain_file(
        Path(model.run_path),
        found.image,
        out or Path(f"explain-{result.id}.png"),
        target=target,
        expected_sha256=model.sha256,
        min_size=min_size,
    )
    for warning in warnings:
        click.echo(f"warning: {found.image}: {warning}", err=True)
    click.echo(
        f"{path}: Grad-CAM ({target}) of result {result.id} ({found.image}) as one tile at the model's "
        f"{model.image_size} px input, {size[0]}x{size[1]} px; "
        f"recorded p={result.p_malignant:.4f} {result.label}, Keras p={p:.4f}, model {model.run_path}"
    )


COMMANDS: list[click.Command] = [audit, explain]
