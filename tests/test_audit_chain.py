"""The one audit chain over results, moves, reports and models; the keyed chain (HMAC under a key file); and
`histod audit verify` on rows whose values were tampered with behind the database's types. Real SQLite files;
tampering is done on a copy with the triggers dropped (tests/test_audit.py's `_tamper`)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from histod.cli import cli
from histod.db import chain, queries
from histod.db.migrations import current_revision, upgrade
from histod.db.models import ModelRecord, Move, Report, Result
from histod.db.session import make_engine, open_database, reading, transaction
from histod.db.verify import chain_rows, typed_values
from histod.errors import DatabaseError
from tests.test_audit import T0, _result, _tamper, _verify

KEY = bytes(range(32))


def _full_db(tmp_path: Path, key: bytes | None = None, name: str = "histod.db") -> tuple[Path, sessionmaker[Session]]:
    """model; results 1-3 and their moves; report 1; results 4-5 and their moves; report 2 (chain_seq 1..13)."""
    path = tmp_path / name
    factory = open_database(f"sqlite:///{path}")
    chain.use_key(factory, key)
    with transaction(factory) as s:
        queries.register_model(
            s, sha256="m" * 64, run_id="r1", run_path=str(tmp_path), engine="litert", image_size=48,
            threshold=0.5, metrics={"roc_auc": 0.87},
        )  # fmt: skip
    _batch(factory, range(1, 4))
    _report(factory)
    _batch(factory, range(4, 6))
    _report(factory)
    return path, factory


def _batch(factory: sessionmaker[Session], ids: range) -> None:
    with transaction(factory) as s:
        rows = queries.record_results(
            s, [_result(f"{i}.png", at=T0 + timedelta(seconds=i), p=i / 6, model_id=1) for i in ids]
        )
    with transaction(factory) as s:
        queries.record_moves(s, [Move(result_id=r.id, ok=True, path=r.stored_path) for r in rows])


def _report(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        queries.add_report(s, queries.summary(s, T0, T0 + timedelta(hours=1)), host="h", model_sha256="m" * 64)


def _broken(path: Path, *args: str) -> str:
    code, out = _verify(path, *args)
    assert code == 1, out
    return out


# --- one chain over the four audit tables ------------------------------------------------------------------
def test_every_audit_row_is_a_link_of_one_chain(tmp_path: Path) -> None:
    path, factory = _full_db(tmp_path)
    with reading(factory) as s:
        rows: list[Any] = [row for cls in (ModelRecord, Result, Move, Report) for row in s.scalars(select(cls))]
        links = [(row.__tablename__, row.id, row.chain_seq, row.prev_hash, row.row_hash) for row in rows]
    links.sort(key=lambda link: link[2])
    assert [link[2] for link in links] == list(range(1, 14))
    assert [(t, i) for t, i, *_ in links] == [
        ("models", 1), ("results", 1), ("results", 2), ("results", 3), ("moves", 1), ("moves", 2), ("moves", 3),
        ("reports", 1), ("results", 4), ("results", 5), ("moves", 4), ("moves", 5), ("reports", 2),
    ]  # fmt: skip
    assert [link[3] for link in links] == [chain.GENESIS] + [link[4] for link in links[:-1]]
    code, out = _verify(path)
    assert code == 0
    assert "ok: 5 results, chain intact; in the same chain 5 moves, 2 reports, 1 models, 0 tile sets (13 rows)" in out
    assert f"last hash  {links[-1][4]}" in out


@pytest.mark.parametrize(
    ("sql", "where", "problem"),
    [
        ("UPDATE moves SET path = '/elsewhere/2.png' WHERE id = 2", "moves row 2", "content does not match"),
        ("UPDATE moves SET ok = 0 WHERE id = 4", "moves row 4", "content does not match"),
        ("UPDATE moves SET error = 'disk full' WHERE id = 5", "moves row 5", "content does not match"),
        ("UPDATE reports SET malignant = 0 WHERE id = 1", "reports row 1", "content does not match"),
        ("UPDATE reports SET summary = '{}' WHERE id = 2", "reports row 2", "content does not match"),
        ("UPDATE models SET run_path = '/elsewhere'", "models row 1", "content does not match"),
        ("DELETE FROM reports WHERE id = 1", "results row 4", "prev_hash does not link"),
        ("DELETE FROM moves WHERE id = 3", "reports row 1", "prev_hash does not link"),
        (  # a forged move slipped into the middle, at a position a result holds
            "INSERT INTO moves (id, result_id, at, ok, path, chain_seq, prev_hash, row_hash) "
            "SELECT 99, 1, '2026-01-02 03:04:06.000000', 1, '/forged', chain_seq, prev_hash, row_hash "
            "FROM results WHERE id = 4",
            "moves row 99",
            "chain_seq repeats",
        ),
    ],
    ids=[
        "move-path", "move-ok", "move-error", "report-count", "report-summary", "model-run-path", "report-deleted",
        "move-deleted", "move-forged",
    ],
)  # fmt: skip
def test_verify_catches_moves_reports_and_models_changed_behind_the_service(
    tmp_path: Path, sql: str, where: str, problem: str
) -> None:
    path, _ = _full_db(tmp_path)
    out = _broken(_tamper(path, tmp_path, sql))
    assert f"BROKEN: {where}: {problem}" in out


def _at_0003(tmp_path: Path, *, model_hash: str | None = None) -> Path:
    """A database at revision 0003 with rows in all four audit tables, as that revision wrote them."""
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, "0003")
    model = {
        "id": 1, "sha256": "m" * 64, "run_id": "r", "run_path": "/runs/r", "engine": "litert", "image_size": 48,
        "threshold": 0.5, "metrics": {"roc_auc": 0.9}, "registered_at": T0, "split_sha256": None,
    }  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, sha256, run_id, run_path, engine, image_size, threshold, metrics, "
                "registered_at, row_hash) VALUES (1, :sha, 'r', '/runs/r', 'litert', 48, 0.5, '{\"roc_auc\": 0.9}', "
                "'2026-01-02 03:04:05.123456', :hash)"
            ),
            {"sha": "m" * 64, "hash": model_hash or chain.model_hash(model)},
        )
        prev = chain.GENESIS
        for i in (1, 2, 3):
            row = chain.as_mapping(_result(f"{i}.png", at=T0 + timedelta(seconds=i), model_id=1))
            row.update(id=i, kind="classification")
            digest = chain.result_hash(prev, row)
            conn.execute(
                text(
                    "INSERT INTO results (id, kind, original_path, name, sha256, size_bytes, received_at, "
                    "classified_at, latency_ms, status, label, p_malignant, threshold, model_id, host, stored_path, "
                    "prev_hash, row_hash) VALUES (:id, 'classification', :original_path, :name, :sha256, 10, "
                    ":received_at, :classified_at, 40.0, 'classified', :label, 0.7, 0.5, 1, 'test', :stored_path, "
                    ":prev, :hash)"
                ),
                {**row, "received_at": row["received_at"].replace(tzinfo=None),
                 "classified_at": row["classified_at"].replace(tzinfo=None), "prev": prev, "hash": digest},
            )  # fmt: skip
            prev = digest
            conn.execute(
                text(
                    f"INSERT INTO moves (id, result_id, at, ok, path) VALUES ({i}, {i}, '2026-01-02 03:05:00', 1, 'p')"
                )
            )
        conn.execute(
            text(
                "INSERT INTO reports (id, created_at, period_start, period_end, total, classified, failed, benign, "
                "malignant, duplicates, mean_p, host, summary) VALUES (1, '2026-01-02 04:00:00.000000', "
                "'2026-01-02 03:00:00.000000', '2026-01-02 04:00:00.000000', 3, 3, 0, 0, 3, 0, 0.7, 'h', "
                "'{\"total\": 3}')"
            )
        )
    engine.dispose()
    return path


def test_migrating_seals_existing_moves_reports_and_models_into_the_chain(tmp_path: Path) -> None:
    path = _at_0003(tmp_path)
    before = _verify(path)  # this histod refuses to read the old schema
    assert before[0] == 5 and "expects 0005" in before[1]
    old = sqlite3.connect(path)
    old_last = old.execute("SELECT row_hash FROM results ORDER BY id DESC LIMIT 1").fetchone()[0]
    old.close()
    factory = open_database(f"sqlite:///{path}")  # the service migrates at start
    assert current_revision(factory.kw["bind"]) == "0005"
    code, out = _verify(path, "--anchor", old_last)  # anchors published before the migration still hold
    assert code == 0
    assert "ok: 3 results, chain intact; in the same chain 3 moves, 1 reports, 1 models, 0 tile sets (8 rows)" in out
    out = _broken(_tamper(path, tmp_path, "UPDATE moves SET path = 'elsewhere' WHERE id = 2"))
    assert "BROKEN: moves row 2: content does not match" in out
    out = _broken(_tamper(path, tmp_path, "UPDATE reports SET total = 4"))
    assert "BROKEN: reports row 1: content does not match" in out
    _batch(factory, range(4, 6))  # and the service appends after the sealed rows
    _report(factory)
    code, out = _verify(path, "--anchor", old_last)
    assert code == 0 and "ok: 5 results, chain intact; in the same chain 5 moves, 2 reports, 1 models" in out
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), sqlite3.connect(path) as raw:
        raw.execute("UPDATE moves SET path = 'x'")


def test_migrating_does_not_seal_a_models_row_that_was_changed(tmp_path: Path) -> None:
    path = _at_0003(tmp_path, model_hash="0" * 64)
    with pytest.raises(DatabaseError, match="models row 1 does not match its row_hash"):
        open_database(f"sqlite:///{path}")
    assert current_revision(make_engine(f"sqlite:///{path}")) == "0003"  # nothing half done
    with sqlite3.connect(path) as raw:
        columns = {row[1] for table in ("results", "models") for row in raw.execute(f"PRAGMA table_info({table})")}
    assert "chain_seq" not in columns


# --- the keyed chain ---------------------------------------------------------------------------------------
def _key_file(tmp_path: Path, mode: int = 0o600, content: str | None = None, name: str = "audit") -> Path:
    path = tmp_path / f"{name}-{mode:o}.key"
    path.write_text(content if content is not None else KEY.hex() + "\n")
    path.chmod(mode)
    return path


def _rewrite(path: Path, tmp_path: Path, *, edit: tuple[str, int, str, Any] | None, macs: str) -> Path:
    """What someone who can write the file (but has no key) does: change a value, then recompute every hash
    from there with histod's own code. ``macs``: "keep" (stale MACs stay), "strip" (all removed), "tail" (removed
    from the changed row on)."""
    copy = _tamper(path, tmp_path)
    engine = make_engine(f"sqlite:///{copy}")
    with engine.connect() as conn:
        rows = list(chain_rows(conn))
    engine.dispose()
    raw = sqlite3.connect(copy)
    prev, changed = chain.GENESIS, False
    for table, row in rows:
        values = typed_values(table, row)
        if edit is not None and (table, row["id"]) == edit[:2]:
            values[edit[2]] = edit[3]
            raw.execute(f"UPDATE {table} SET {edit[2]} = ? WHERE id = ?", (edit[3], row["id"]))
            changed = True
        digest = chain.link_hash(table, prev, values)
        row_mac = None if macs == "strip" or (macs == "tail" and changed) else row["row_mac"]
        raw.execute(
            f"UPDATE {table} SET prev_hash = ?, row_hash = ?, row_mac = ? WHERE id = ?",
            (prev, digest, row_mac, row["id"]),
        )
        prev = digest
    raw.commit()
    raw.close()
    return copy


def test_keygen_writes_a_key_only_its_owner_can_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    got = CliRunner().invoke(cli, ["audit", "keygen", str(path)])
    assert got.exit_code == 0, got.output
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    assert chain.load_key(path) == bytes.fromhex(path.read_text().strip())
    again = CliRunner().invoke(cli, ["audit", "keygen", str(path)])
    assert again.exit_code == 2 and "never overwritten" in again.output


@pytest.mark.parametrize(
    ("mode", "content", "message"),
    [
        (0o640, None, "open to group or others (mode 0640)"),
        (0o604, None, "open to group or others (mode 0604)"),
        (0o620, None, "open to group or others (mode 0620)"),
        (0o600, "not a key\n", "not hex text"),
        (0o600, "abcd\n", "has 2 bytes; at least 32"),
    ],
)
def test_a_key_file_others_may_read_or_a_bad_key_is_refused(
    tmp_path: Path, mode: int, content: str | None, message: str
) -> None:
    path, _ = _full_db(tmp_path)
    got = CliRunner().invoke(
        cli, ["audit", "verify", "--db", f"sqlite:///{path}", "--key-file", str(_key_file(tmp_path, mode, content))]
    )
    assert got.exit_code == 2 and message in got.output, got.output
    assert len(got.output.splitlines()) == 1


def test_verify_with_the_key_proves_the_chain(tmp_path: Path) -> None:
    path, factory = _full_db(tmp_path, key=KEY)
    with reading(factory) as s:
        assert all(r.row_mac == chain.mac(KEY, r.row_hash) for r in s.scalars(select(Move)))
    key = _key_file(tmp_path)
    code, out = _verify(path, "--key-file", str(key))
    assert code == 0 and "keyed: intact under the key; the last row's MAC vouches for all 13 rows" in out, out
    code, out = _verify(path)  # without the key: the plain chain, and a note that MACs went unchecked
    assert code == 0 and "13 of 13 rows carry a MAC, not checked" in out


def test_a_rewritten_chain_passes_the_plain_check_and_fails_with_the_key(tmp_path: Path) -> None:
    path, _ = _full_db(tmp_path, key=KEY)
    key = str(_key_file(tmp_path))
    flipped = _rewrite(path, tmp_path, edit=("results", 3, "label", "Benign"), macs="keep")
    assert _verify(flipped)[0] == 0  # what a plain chain cannot tell: every hash was recomputed
    out = _broken(flipped, "--key-file", key)
    assert "BROKEN: results row 3: row_mac does not match" in out
    stripped = _rewrite(path, tmp_path, edit=("results", 3, "label", "Benign"), macs="strip")
    assert "BROKEN: reports row 2: the last row of the chain has no MAC" in _broken(stripped, "--key-file", key)
    cut = _rewrite(path, tmp_path, edit=("moves", 2, "path", "/elsewhere"), macs="tail")
    assert "BROKEN: moves row 2: no MAC after keyed rows" in _broken(cut, "--key-file", key)
    other = _key_file(tmp_path, content="ab" * 32, name="other")
    assert "BROKEN: models row 1: row_mac does not match" in _broken(path, "--key-file", str(other))


def test_a_key_added_later_seals_the_rows_before_it(tmp_path: Path) -> None:
    path, factory = _full_db(tmp_path)  # no key yet
    chain.use_key(factory, KEY)
    _batch(factory, range(6, 8))
    key = str(_key_file(tmp_path))
    code, out = _verify(path, "--key-file", key)
    assert code == 0 and "vouches for all 17 rows (4 carry a MAC)" in out, out
    changed = _rewrite(path, tmp_path, edit=("results", 2, "label", "Malignant"), macs="keep")
    assert _verify(changed)[0] == 0
    assert "BROKEN: results row 6: row_mac does not match" in _broken(changed, "--key-file", key)


def test_the_service_and_reviews_write_keyed_rows(tiny_run_dir: Path, tmp_path: Path) -> None:
    from tests.test_imaging import encode, noise

    key = _key_file(tmp_path)
    data = tmp_path / "data"
    (data / "prediction").mkdir(parents=True)
    for i in range(3):
        (data / "prediction" / f"{i}.png").write_bytes(encode(noise(48, seed=i), "PNG"))
    env = {"HISTOD_AUDIT_KEY_FILE": str(key), "HISTOD_STABLE_MS": "0"}
    flags = ["--data-dir", str(data), "--model", str(tiny_run_dir)]
    got = CliRunner().invoke(cli, ["serve", "--once", *flags], env=env)
    assert got.exit_code == 0, got.output
    where = ["--data-dir", str(data)]
    got = CliRunner().invoke(cli, ["audit", "review", "2", "--label", "Benign", "--reviewer", "Dr A", *where], env=env)
    assert got.exit_code == 0, got.output
    db = sqlite3.connect(data / "histod.db")
    for table in ("results", "moves", "reports", "models"):
        rows = db.execute(f"SELECT row_hash, row_mac FROM {table}").fetchall()
        assert rows and all(m == chain.mac(KEY, h) for h, m in rows), table
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 4
    db.close()
    code, out = _verify(data / "histod.db", "--key-file", str(key))
    assert code == 0 and "keyed: intact under the key" in out
    key.chmod(0o644)  # a key others may read is refused before anything is written
    (data / "prediction" / "late.png").write_bytes(encode(noise(48, seed=9), "PNG"))
    got = CliRunner().invoke(cli, ["serve", "--once", *flags], env=env)
    assert got.exit_code == 2 and "open to group or others" in got.output
    assert (data / "prediction" / "late.png").exists()


# --- values tampered with behind the database's types ------------------------------------------------------
def _loosen(path: Path, tmp_path: Path, table: str, sql: str) -> Path:
    """A copy where ``table`` was rebuilt without its NOT NULL constraints, then ``sql`` ran."""
    copy = _tamper(path, tmp_path)
    raw = sqlite3.connect(copy)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
    raw.execute(f"CREATE TABLE {table} AS SELECT * FROM old_{table}")
    raw.execute(f"DROP TABLE old_{table}")
    raw.execute(sql)
    raw.commit()
    raw.close()
    return copy


TYPE_TAMPERING = [
    ("UPDATE results SET name = X'00FF' WHERE id = 2", "results row 2", "name is not text", "a blob"),
    ("UPDATE results SET p_malignant = 'abc' WHERE id = 3", "results row 3", "p_malignant is not a number", "'abc'"),
    ("UPDATE results SET received_at = 'not a time' WHERE id = 4", "results row 4", "received_at is not a timestamp",
     "'not a time'"),
    ("UPDATE results SET amends_id = 'x' WHERE id = 5", "results row 5", "amends_id is not an integer", "'x'"),
    ("UPDATE models SET metrics = 'not json'", "models row 1", "metrics is not JSON", "'not json'"),
    ("UPDATE moves SET ok = 'yes' WHERE id = 1", "moves row 1", "ok is not a boolean", "'yes'"),
    ("UPDATE moves SET at = 12 WHERE id = 2", "moves row 2", "at is not a timestamp", "12"),
    ("UPDATE reports SET total = 'many' WHERE id = 1", "reports row 1", "total is not an integer", "'many'"),
    ("UPDATE reports SET summary = X'7B7D' WHERE id = 2", "reports row 2", "summary is not JSON", "a blob"),
    ("UPDATE results SET chain_seq = 'x' WHERE id = 2", "results row 2", "chain_seq is not a position", "'x'"),
    ("UPDATE moves SET row_hash = X'00' WHERE id = 3", "moves row 3", "row_hash is not a hash", "b'\\x00'"),
    ("UPDATE results SET name = 'a' || char(27) || '[2K' WHERE id = 1", "results row 1", "content does not match",
     "expected"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "where", "problem", "found"), TYPE_TAMPERING)
def test_type_tampering_is_a_broken_row_not_a_traceback(
    tmp_path: Path, sql: str, where: str, problem: str, found: str
) -> None:
    path, _ = _full_db(tmp_path)
    code, out = _verify(_tamper(path, tmp_path, sql))
    assert code == 1, out
    assert f"BROKEN: {where}: {problem}" in out
    assert found in out


@pytest.mark.parametrize(
    ("table", "sql", "where", "problem"),
    [
        ("results", "UPDATE results SET host = NULL WHERE id = 2", "results row 2", "host is NULL where a value is"),
        ("moves", "UPDATE moves SET path = NULL WHERE id = 4", "moves row 4", "path is NULL where a value is"),
        ("moves", "UPDATE moves SET chain_seq = NULL WHERE id = 2", "moves row 2", "chain_seq is not a position"),
        ("reports", "UPDATE reports SET prev_hash = NULL WHERE id = 1", "reports row 1", "prev_hash is not a hash"),
    ],
)
def test_null_where_a_value_is_required_is_a_broken_row(
    tmp_path: Path, table: str, sql: str, where: str, problem: str
) -> None:
    path, _ = _full_db(tmp_path)
    out = _broken(_loosen(path, tmp_path, table, sql))
    assert f"BROKEN: {where}: {problem}" in out


def test_verify_prints_one_broken_line_and_no_traceback(tmp_path: Path) -> None:
    path, _ = _full_db(tmp_path)
    copy = _tamper(path, tmp_path, "UPDATE results SET p_malignant = 'abc' WHERE id = 3")
    out = subprocess.run(
        [sys.executable, "-m", "histod", "audit", "verify", "--db", f"sqlite:///{copy}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("HISTOD_")},
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    events = [json.loads(line) for line in out.stderr.splitlines()]  # not a terminal: JSON lines only
    (broken,) = [e for e in events if e["event"] == "audit.broken"]
    assert str(broken["message"]).startswith("results row 3: p_malignant is not a number\n"), out.stderr
    assert "found    'abc'" in str(broken["message"]) and broken["level"] == "error"


def test_verify_takes_the_key_from_the_settings_and_no_key_skips_it(tmp_path: Path) -> None:
    path, _ = _full_db(tmp_path, key=KEY)
    flipped = _rewrite(path, tmp_path, edit=("results", 3, "label", "Benign"), macs="keep")
    db = ["--log-format", "console", "audit", "verify", "--db", f"sqlite:///{flipped}"]
    env = {"HISTOD_AUDIT_KEY_FILE": str(_key_file(tmp_path))}
    got = CliRunner().invoke(cli, db, env=env)
    assert got.exit_code == 1 and "BROKEN: results row 3: row_mac does not match" in got.output
    env = {"HISTOD_AUDIT_KEY_FILE": str(_key_file(tmp_path, 0o644))}  # an auditor's view: a key they may not use
    assert CliRunner().invoke(cli, db, env=env).exit_code == 2
    got = CliRunner().invoke(cli, [*db, "--no-key"], env=env)
    assert got.exit_code == 0 and "not checked (no key given)" in got.output


def test_processes_opening_a_new_database_together_migrate_it_once(tmp_path: Path) -> None:
    """A service and a reader (or several) that open a new SQLite file at the same moment: each migration is one
    transaction under the write lock, so the others wait and find the schema at head (never half migrated)."""
    code = (
        "import sys\n"
        "from histod.db.session import open_database\n"
        "from histod.db.migrations import current_revision\n"
        "f = open_database(sys.argv[1])\n"
        "print(current_revision(f.kw['bind']))\n"
    )
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOD_")}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err[-600:] for _, err in outs]
        assert {out.strip() for out, _ in outs} == {"0005"}
        code_, out = _verify(Path(url.removeprefix("sqlite:///")))
        assert code_ == 0, out
