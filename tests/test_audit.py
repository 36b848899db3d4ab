"""The audit trail on real SQLite files: append-only triggers, the hash chain and `histod audit verify` against
tampering, reviews, provenance, the migrations from 0001 with existing rows, and concurrent writers. The chain
over moves, reports and models, the keyed chain and type tampering: tests/test_audit_chain.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from histod.cli import cli
from histod.db import chain, queries
from histod.db.migrations import current_revision, head_revision, upgrade
from histod.db.models import KIND_CLASSIFICATION, KIND_REVIEW, ModelRecord, Move, Result
from histod.db.session import make_engine, open_database, open_read_only, reading, transaction
from histod.errors import ConfigError, DatabaseError, ReviewError

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
TABLES = ("results", "models", "moves", "reports")


def _result(
    name: str, sha: str | None = None, *, at: datetime = T0, p: float = 0.7, model_id: int | None = None
) -> Result:
    return Result(
        original_path=f"/watch/{name}",
        name=name,
        sha256=sha or f"sha-{name}",
        size_bytes=10,
        received_at=at,
        classified_at=at + timedelta(milliseconds=40),
        latency_ms=40,
        status="classified",
        label="Malignant" if p >= 0.5 else "Benign",
        p_malignant=p,
        threshold=0.5,
        model_id=model_id,
        host="test",
        stored_path=f"/data/processed/{name}",
    )


def _db(tmp_path: Path, n: int = 5) -> tuple[Path, sessionmaker[Session]]:
    path = tmp_path / "histod.db"
    factory = open_database(f"sqlite:///{path}")
    with transaction(factory) as s:
        model = queries.register_model(
            s,
            sha256="m" * 64,
            run_id="r1",
            run_path=str(tmp_path),
            engine="litert",
            image_size=48,
            threshold=0.5,
            metrics={"roc_auc": 0.87, "split": "validation"},
        )
        rows = queries.record_results(
            s, [_result(f"{i}.png", at=T0 + timedelta(seconds=i), p=i / n, model_id=model.id) for i in range(n)]
        )
        queries.record_moves(s, [Move(result_id=r.id, ok=True, path=r.stored_path) for r in rows])
    return path, factory


def _verify(path: Path, *args: str) -> tuple[int, str]:
    """`histod audit verify` as an auditor reads it (console text: in JSON mode the verdict is an event)."""
    got = CliRunner().invoke(cli, ["--log-format", "console", "audit", "verify", "--db", f"sqlite:///{path}", *args])
    return got.exit_code, got.output


def _tamper(path: Path, tmp_path: Path, *sql: str) -> Path:
    """A copy of the database with the triggers dropped and ``sql`` run behind the service's back."""
    copy = tmp_path / f"tampered-{len(list(tmp_path.glob('tampered-*')))}.db"
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    conn = sqlite3.connect(copy)
    for table in TABLES:
        conn.execute(f"DROP TRIGGER {table}_no_update")
        conn.execute(f"DROP TRIGGER {table}_no_delete")
    conn.execute("PRAGMA foreign_keys = OFF")
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return copy


def test_the_database_refuses_updates_and_deletes_of_every_audit_table(tmp_path: Path) -> None:
    path, factory = _db(tmp_path)
    with transaction(factory) as s:
        queries.add_report(s, queries.summary(s, T0, T0 + timedelta(hours=1)), host="h", model_sha256=None)
    conn = sqlite3.connect(path)
    for table in TABLES:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 1
        for statement in (f"UPDATE {table} SET id = id", f"DELETE FROM {table}"):
            with pytest.raises(sqlite3.IntegrityError, match=f"{table} are append-only"):
                conn.execute(statement)
    conn.close()


def test_verify_passes_on_a_clean_database_and_names_the_chain_ends(tmp_path: Path) -> None:
    path, factory = _db(tmp_path)
    code, out = _verify(path)
    assert code == 0, out
    with reading(factory) as s:
        rows = queries.list_results(s)
        model = s.get(ModelRecord, 1)
        moves = list(s.scalars(select(Move).order_by(Move.id)))
    assert model is not None and (model.chain_seq, model.prev_hash) == (1, chain.GENESIS)  # registered first
    assert rows[0].prev_hash == model.row_hash
    assert [r.prev_hash for r in rows[1:]] == [r.row_hash for r in rows[:-1]]
    assert moves[0].prev_hash == rows[-1].row_hash and [m.chain_seq for m in moves] == [7, 8, 9, 10, 11]
    assert (
        "ok: 5 results, chain intact; in the same chain 5 moves, 0 reports, 1 models, 0 tile sets (11 rows)\n"
        f"first hash {model.row_hash}\nlast hash  {moves[-1].row_hash}\n"
    ) in out
    assert _verify(path, "--anchor", rows[2].row_hash)[0] == 0


@pytest.mark.parametrize(
    ("sql", "where", "problem"),
    [
        (["UPDATE results SET label = 'Benign' WHERE id = 4"], "results row 4", "content does not match"),
        (["UPDATE results SET p_malignant = 0.4000001 WHERE id = 5"], "results row 5", "content does not match"),
        (["DELETE FROM moves WHERE result_id = 2", "DELETE FROM results WHERE id = 2"], "results row 3", "prev_hash"),
        (["DELETE FROM moves WHERE result_id = 1", "DELETE FROM results WHERE id = 1"], "results row 2", "prev_hash"),
        (  # swap the contents of rows 2 and 4 (ids stay in order)
            [
                "UPDATE results SET id = 100 WHERE id = 2",
                "UPDATE results SET id = 2 WHERE id = 4",
                "UPDATE results SET id = 4 WHERE id = 100",
            ],
            "results row 2",
            "prev_hash",
        ),
        (["UPDATE results SET received_at = '2026-01-02 03:04:06.000000' WHERE id = 2"], "results row 2", "content"),
        (["UPDATE models SET metrics = '{\"roc_auc\": 0.99}'"], "models row 1", "content does not match"),
        (["DELETE FROM results WHERE id = 5"], "moves row 1", "prev_hash"),
        (["DELETE FROM models"], "results row 1", "prev_hash"),
    ],
)
def test_verify_catches_rows_changed_or_removed_behind_the_service(
    tmp_path: Path, sql: list[str], where: str, problem: str
) -> None:
    path, _ = _db(tmp_path)
    code, out = _verify(_tamper(path, tmp_path, *sql))
    assert code == 1
    assert f"BROKEN: {where}: {problem}" in out
    assert "expected " in out and "found    " in out


def test_a_row_removed_from_the_end_is_caught_by_an_earlier_anchor(tmp_path: Path) -> None:
    path, factory = _db(tmp_path)
    with reading(factory) as s:
        last = chain.head(s)[1]
    copy = _tamper(path, tmp_path, "DELETE FROM moves WHERE id = 5")
    assert _verify(copy)[0] == 0  # a shorter chain is still a chain: that is what anchors are for
    code, out = _verify(copy, "--anchor", last)
    assert code == 1 and "an anchor hash is not in the chain" in out and last in out


def test_a_review_is_a_new_chained_row_that_amends_the_original(tmp_path: Path) -> None:
    path, factory = _db(tmp_path)
    got = CliRunner().invoke(
        cli,
        [
            "audit",
            "review",
            "4",
            "--label",
            "benign",
            "--reviewer",
            "Dr. A",
            "--note",
            "cut",
            "--db",
            f"sqlite:///{path}",
        ],
    )
    assert got.exit_code == 0, got.output
    with reading(factory) as s:
        original = s.get(Result, 4)
        (review,) = queries.amendments(s, 4)
        assert original is not None and original.label == "Malignant" and original.kind == KIND_CLASSIFICATION
        assert (review.id, review.kind, review.label, review.reviewer, review.note) == (
            6,
            KIND_REVIEW,
            "Benign",
            "Dr. A",
            "cut",
        )
        assert review.stored_path == original.stored_path and review.p_malignant is None
        # the service's own questions never see reviews
        assert queries.unmoved_results(s) == []
        assert queries.find_unmoved(s, original.original_path, original.sha256) is None
        assert queries.summary(s, T0, T0 + timedelta(hours=1)).total == 5
    assert _verify(path)[0] == 0
    with pytest.raises(ConfigError, match="label must be"), transaction(factory) as s:
        queries.add_review(s, 3, label="maybe", reviewer="x", note=None, host="h")
    with pytest.raises(ConfigError, match="no result 99"), transaction(factory) as s:
        queries.add_review(s, 99, label="Benign", reviewer="x", note=None, host="h")


def test_results_show_which_rows_are_reviews_and_what_they_amend(tmp_path: Path) -> None:
    path, factory = _db(tmp_path, n=3)
    with transaction(factory) as s:
        queries.add_review(s, 2, label="Benign", reviewer="Dr. A", note=None, host="h")
    runner = CliRunner()
    db = ["--db", f"sqlite:///{path}"]

    def run(*args: str) -> str:
        got = runner.invoke(cli, ["results", *args, *db])
        assert got.exit_code == 0, got.output
        return got.stdout

    expected = [(1, "classification", None), (2, "classification", None), (3, "classification", None), (4, "review", 2)]
    as_json = json.loads(run("--format", "json"))
    assert [(r["id"], r["kind"], r["amends_id"]) for r in as_json] == expected
    as_csv = list(csv.DictReader(io.StringIO(run("--format", "csv"))))
    assert [(int(r["id"]), r["kind"], int(r["amends_id"]) if r["amends_id"] else None) for r in as_csv] == expected
    header, *lines = run().splitlines()
    assert header.split() == [
        "id",
        "received_at",
        "kind",
        "status",
        "label",
        "p_malignant",
        "error_reason",
        "duplicate_of",
        "amends_id",
        "reviewer",
        "name",
        "note",
    ]
    cells = lines[3].split()  # received_at is two cells (date, time), and so is the reviewer "Dr. A"
    assert (cells[0], cells[3], cells[4], cells[5], cells[9], cells[10:12]) == (
        "4",
        "review",
        "reviewed",
        "Benign",
        "2",
        ["Dr.", "A"],
    )
    (reviewed,) = json.loads(run("--status", "reviewed", "--format", "json"))
    assert (reviewed["id"], reviewed["kind"], reviewed["amends_id"]) == (4, "review", 2)


def test_a_review_of_a_failed_file_or_of_a_review_is_refused(tmp_path: Path) -> None:
    path, factory = _db(tmp_path, n=2)
    failed = _result("text.jpg", at=T0 + timedelta(seconds=9))
    failed.status, failed.label, failed.p_malignant, failed.error_reason = "failed", None, None, "not_an_image"
    with transaction(factory) as s:
        (row,) = queries.record_results(s, [failed])
        queries.add_review(s, 1, label="Benign", reviewer="Dr. A", note=None, host="h")
    assert row.id == 3
    with pytest.raises(ReviewError, match=r"result 3 is not a classification.*not_an_image"), transaction(factory) as s:
        queries.add_review(s, 3, label="Benign", reviewer="Dr. A", note=None, host="h")
    db = ["--db", f"sqlite:///{path}"]
    got = CliRunner().invoke(
        cli, ["--log-format", "console", "audit", "review", "3", "--label", "Malignant", "--reviewer", "Dr. A", *db]
    )
    assert got.exit_code == 2 and "error: result 3 is not a classification" in got.output, got.output
    assert "Traceback" not in got.output
    got = CliRunner().invoke(
        cli, ["--log-format", "console", "audit", "review", "4", "--label", "Malignant", "--reviewer", "Dr. B", *db]
    )
    assert got.exit_code == 2 and "result 4 is itself a review (of result 1): review result 1" in got.output
    with reading(factory) as s:
        assert [r.kind for r in queries.list_results(s)] == [KIND_CLASSIFICATION] * 3 + [KIND_REVIEW]


def test_results_lists_the_newest_50_unless_all(tmp_path: Path) -> None:
    path, _ = _db(tmp_path, n=60)
    db = ["--db", f"sqlite:///{path}"]
    table = CliRunner().invoke(cli, ["results", *db]).stdout.splitlines()
    assert table[-1] == "(50 rows: the newest of 60; --all or --limit N for more)"
    assert [line.split()[0] for line in table[1:-1]] == [str(i) for i in range(11, 61)]  # oldest first
    every = json.loads(CliRunner().invoke(cli, ["results", "--all", "--json", *db]).stdout)
    assert [r["id"] for r in every] == list(range(1, 61))
    got = CliRunner().invoke(cli, ["--log-format", "json", "results", "--format", "csv", "--limit", "5", *db])
    assert len(list(csv.DictReader(io.StringIO(got.stdout)))) == 5
    assert '"event": "results.limited"' in got.stderr
    got = CliRunner().invoke(cli, ["results", "--all", "--limit", "5", *db])
    assert got.exit_code == 2 and "give one of them" in got.output


def test_the_models_row_records_provenance(tmp_path: Path) -> None:
    (tmp_path / "split.csv").write_text("path,label,group,split\na.png,0,p1,train\n")
    _, factory = _db(tmp_path)
    with reading(factory) as s:
        (row,) = queries.list_results(s, queries.ResultFilter(limit=1))
        model = s.get(ModelRecord, row.model_id)
    assert model is not None
    assert model.split_sha256 == hashlib.sha256((tmp_path / "split.csv").read_bytes()).hexdigest()
    assert model.metrics["roc_auc"] == 0.87 and model.run_path == str(tmp_path)
    assert model.row_hash == chain.link_hash("models", model.prev_hash, chain.as_mapping(model, chain.MODEL_FIELDS))


def test_migrating_0001_to_0002_hashes_existing_rows_in_id_order(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, sha256, run_id, run_path, engine, image_size, threshold, metrics, "
                "registered_at) VALUES (1, :sha, 'r', '/gone', 'litert', 48, 0.5, '{\"auc\": 0.9}', "
                "'2026-01-01 00:00:00.000000')"
            ),
            {"sha": "m" * 64},
        )
        for i in (1, 2, 3, 7):  # a gap, as a PostgreSQL sequence leaves after a rollback
            conn.execute(
                text(
                    "INSERT INTO results (id, original_path, name, sha256, size_bytes, received_at, classified_at, "
                    "latency_ms, status, label, p_malignant, threshold, model_id, model_sha256, host, stored_path) "
                    f"VALUES ({i}, '/w/{i}', '{i}', 'h{i}', 10, '2026-01-01 00:00:0{i}.000000', "
                    f"'2026-01-01 00:00:0{i}.500000', 500, 'classified', 'Benign', 0.1, 0.5, 1, :sha, 'h', '/p/{i}')"
                ),
                {"sha": "m" * 64},
            )
            conn.execute(text(f"INSERT INTO moves (result_id, at, ok, path) VALUES ({i}, '2026-01-01', 1, '/p/{i}')"))
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0005"
    factory = open_database(f"sqlite:///{path}")
    with reading(factory) as s:
        rows = queries.list_results(s)
        head = chain.head(s)
    assert [r.id for r in rows] == [1, 2, 3, 7] and {r.kind for r in rows} == {KIND_CLASSIFICATION}
    assert rows[0].prev_hash == chain.GENESIS and rows[3].prev_hash == rows[2].row_hash
    assert head[0] == 4 + 1 + 4  # the results, then the models row and the moves sealed after them
    assert _verify(path)[0] == 0
    with transaction(factory) as s:  # the service appends after the backfilled rows
        (new,) = queries.record_results(s, [_result("new.png", model_id=1)])
    assert (new.id, new.chain_seq, new.prev_hash) == (8, head[0] + 1, head[1])
    assert _verify(path)[0] == 0
    raw = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM results WHERE id = 1")
    raw.close()


def test_concurrent_writers_cannot_fork_the_chain(tmp_path: Path) -> None:
    path, _ = _db(tmp_path, n=1)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        factory = open_database(f"sqlite:///{path}")  # its own engine and connections
        try:
            for j in range(15):
                with transaction(factory) as s:
                    queries.stored_path_taken(s, "/x")  # a read before the insert, as the service does
                    queries.record_results(s, [_result(f"w{k}-{j}-{i}.png") for i in range(2)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    code, out = _verify(path)
    assert code == 0 and "ok: 91 results" in out, out


def test_readers_never_migrate_and_refuse_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, "0001")
    for args in (["results"], ["report"], ["audit", "verify"], ["audit", "export", str(tmp_path / "x.csv")]):
        got = CliRunner().invoke(cli, [*args, "--db", f"sqlite:///{path}"])
        assert got.exit_code == 5, got.output
        assert "schema is at revision 0001, this histod expects 0005" in got.output
    assert current_revision(engine) == "0001"
    got = CliRunner().invoke(cli, ["results", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert got.exit_code == 5 and "no results database" in got.output
    assert not (tmp_path / "none.db").exists()


def test_readers_cannot_write(tmp_path: Path) -> None:
    path, _ = _db(tmp_path)
    factory = open_read_only(f"sqlite:///{path}")
    with pytest.raises(DatabaseError, match="readonly"), transaction(factory) as s:
        queries.record_results(s, [_result("x.png")])


def test_a_stopped_database_in_a_folder_the_reader_cannot_write_opens_immutable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path, factory = _db(folder)
    factory.kw["bind"].dispose()  # the service stopped: SQLite checkpoints and removes -wal and -shm
    assert not (folder / "histod.db-wal").exists()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (it stands in for a folder the auditor may not write)")
    try:
        with pytest.raises(OSError):
            (folder / "probe").touch()
        code, out = _verify(path)
        assert code == 0 and "ok: 5 results" in out
        assert "immutable=1" in out
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_export_writes_rows_and_a_manifest_that_pins_them_to_the_chain(tmp_path: Path, suffix: str) -> None:
    path, factory = _db(tmp_path)
    out = tmp_path / "exports" / f"audit.{suffix}"
    since = (T0 + timedelta(seconds=2)).isoformat()
    got = CliRunner().invoke(cli, ["audit", "export", str(out), "--since", since, "--db", f"sqlite:///{path}"])
    assert got.exit_code == 0, got.output
    if suffix == "csv":
        with out.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = json.loads(out.read_text())
    with reading(factory) as s:
        expected = [r for r in queries.list_results(s) if r.received_at >= T0 + timedelta(seconds=2)]
    assert [int(r["id"]) for r in rows] == [r.id for r in expected] == [3, 4, 5]
    assert [r["row_hash"] for r in rows] == [r.row_hash for r in expected]
    assert rows[1]["prev_hash"] == rows[0]["row_hash"]
    manifest = json.loads((out.parent / f"audit.{suffix}.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (manifest["rows"], manifest["first_id"], manifest["last_id"]) == (3, 3, 5)
    assert (manifest["first_hash"], manifest["last_hash"]) == (expected[0].row_hash, expected[-1].row_hash)
    assert manifest["format"] == suffix and manifest["filters"]["since"].startswith("2026-01-02T03:04:07")
    # the manifest's last hash is an anchor for later checks
    assert _verify(path, "--anchor", manifest["last_hash"])[0] == 0
    got = CliRunner().invoke(cli, ["audit", "export", str(tmp_path / "x.txt"), "--db", f"sqlite:///{path}"])
    assert got.exit_code == 2 and "--format" in got.output
