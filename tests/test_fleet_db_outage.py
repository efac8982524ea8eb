"""The gateway's database out of reach while frames come in: 503 with ``Retry-After``, the
frame's files kept for the retry, nothing acknowledged (``fleet.committer``: a database that
cannot run statements fails the whole batch as ``CommitFailed``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from fleet.committer import CommitFailed, GroupCommitter
from fleet.db import Database

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, meta, post_frame
from .test_frame_batch import batch_body, post_batch

make_env = gateway_tests.make_env
frame_jpeg = gateway_tests.frame_jpeg


def _gone(statement: str = "SELECT 1") -> OperationalError:
    return OperationalError(statement, {}, Exception("server closed the connection unexpectedly"))


def test_an_unreachable_database_fails_the_batch_a_refused_row_only_its_caller(
        tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    committer = GroupCommitter(db)
    committer.start()
    try:
        def unreachable(session: Session) -> None:
            raise _gone()

        def refused(session: Session) -> None:
            raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))

        with pytest.raises(CommitFailed, match="database is unavailable") as failed:
            committer.submit(unreachable)
        assert "server closed" not in str(failed.value)  # the driver's words stay in the log
        with pytest.raises(IntegrityError):
            committer.submit(refused)
        assert committer.submit(lambda session: 42) == 42
    finally:
        committer.stop()
        db.dispose()
    from fleet.db import database_unavailable

    assert database_unavailable(_gone())
    assert not database_unavailable(IntegrityError("INSERT", {}, Exception("duplicate")))


def _assert_retry_later_and_files_kept(env: Env, r: Any, frame_id: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert "not acknowledged" in r.json()["detail"]
    assert env.gw.store.find_frame("cam-a", frame_id) is not None


def test_sqlite_database_locked_answers_503_and_keeps_the_files(
        make_env: Any, frame_jpeg: bytes) -> None:
    """Another process holds SQLite's write lock past the busy timeout: ``database is
    locked``."""
    env = make_env(sqlite_busy_timeout_ms=50)
    tok = env.enroll("cam-a")["access_token"]
    assert env.settings.database_url is not None
    holder = sqlite3.connect(env.settings.database_url.removeprefix("sqlite:///"),
                             isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        _assert_retry_later_and_files_kept(
            env, post_frame(env.client, tok, meta("f-1"), frame_jpeg), "f-1")
        out = post_batch(env, tok, batch_body([(meta("f-2"), frame_jpeg),
                                               (meta("f-3"), frame_jpeg)]))
        assert [x["status"] for x in out.json()["results"]] == [503, 503]
        assert out.headers["retry-after"] == "1"
        assert env.gw.store.find_frame("cam-a", "f-2") is not None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert env.rows() == []
    for fid in ("f-1", "f-2"):  # the retries find their files in place
        assert post_frame(env.client, tok, meta(fid), frame_jpeg).status_code == 201
    assert sorted(r.frame_id for r in env.rows()) == ["f-1", "f-2"]


def test_postgres_unreachable_answers_503_and_keeps_the_files(
        make_env: Any, postgres_server: Any, frame_jpeg: bytes) -> None:
    """The gateway's database stops taking connections and its sessions are cut (a restart,
    a failover): the upload is a 503 to retry, not a 500 that deletes the frame's files."""
    url = postgres_server.new_database("outage")
    name = url.rsplit("/", 1)[1]
    env = make_env(database_url=url)
    env.gw.auth_cache.clock = lambda: 0.0  # the device's principal stays cached meanwhile
    tok = env.enroll("cam-a")["access_token"]
    assert post_frame(env.client, tok, meta("f-0"), frame_jpeg).status_code == 201
    admin = psycopg2.connect(host=postgres_server.host, port=postgres_server.port,
                             user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        _assert_retry_later_and_files_kept(
            env, post_frame(env.client, tok, meta("f-1"), frame_jpeg), "f-1")
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    assert sorted(r.frame_id for r in env.rows()) == ["f-0", "f-1"]


def test_a_refused_write_leaves_none_of_its_statements_committed_alone_or_in_a_batch(
        tmp_path: Path) -> None:
    """A batch of one runs without a SAVEPOINT: a caller whose ``fn`` wrote and then raised
    must still find nothing of it committed, as inside a batch, where its neighbours' writes
    are committed."""
    import threading

    from sqlalchemy import text

    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    committer = GroupCommitter(db)
    committer.start()

    def write_then(key: str, fail: bool) -> Any:
        def fn(session: Session) -> str:
            session.execute(text("INSERT INTO t (k) VALUES (:k)"), {"k": key})
            if fail:
                raise IntegrityError("INSERT", {}, Exception(f"{key} refused"))
            return key
        return fn

    try:
        committer.submit(lambda s: s.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)")))
        with pytest.raises(IntegrityError, match="alone refused"):
            committer.submit(write_then("alone", fail=True))

        # Two writes in ONE batch: both queued while the committer runs a blocking write.
        release, running = threading.Event(), threading.Event()

        def blocker(session: Session) -> None:
            running.set()
            assert release.wait(30)

        results: dict[str, Any] = {}

        def submit(name: str, fn: Any) -> None:
            try:
                results[name] = committer.submit(fn)
            except IntegrityError as exc:
                results[name] = exc

        threads = [threading.Thread(target=submit, args=("blocker", blocker))]
        threads[0].start()
        assert running.wait(30)
        for name, fail in (("batched-bad", True), ("batched-good", False)):
            threads.append(threading.Thread(target=submit, args=(name, write_then(name, fail))))
            threads[-1].start()
        while committer._queue.qsize() < 2:  # both queued behind the blocker
            threading.Event().wait(0.01)
        release.set()
        for t in threads:
            t.join(30)
        assert isinstance(results["batched-bad"], IntegrityError)
        assert results["batched-good"] == "batched-good"
        assert committer.items - committer.batches >= 1  # the two shared one batch
        with db.read() as session:
            keys = {k for (k,) in session.execute(text("SELECT k FROM t"))}
        assert keys == {"batched-good"}
    finally:
        committer.stop()
        db.dispose()
