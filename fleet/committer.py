"""Group commit: many requests, one durable transaction, each caller released after it.

A frame may only be acknowledged once its row is committed, and with ``synchronous=FULL``
every SQLite commit is an fsync (about 5 ms on the reference disk): committing per request
caps the gateway near 200 frames/s however many threads it has. Here one thread drains the
queue of pending writes, runs each in its own SAVEPOINT (so one duplicate does not sink its
neighbours; a batch of one needs none) and commits them together; every caller waits for
*that* commit before it answers. Nothing is acknowledged before it is durable.

``before_commit`` (optional) runs on the writer thread before each batch's transaction: the
gateway passes the frame store's ``sync`` there, so the files of every frame in the batch
are durable before its row is committed, with one barrier per batch instead of fsyncs per
frame. If it raises, the whole batch fails (``CommitFailed``: nothing acknowledged).

An error of one ``fn`` that says the data was refused (``IntegrityError``, ``DataError``...)
goes back to that caller alone. One that says the database cannot be reached or cannot run
statements now (``fleet.db.database_unavailable``: connection refused or lost, server
restarting, lock timeout, deadlock, ``database is locked``) fails the whole batch as
``CommitFailed`` instead: the callers answer 503 and keep what they wrote, as for a failed
commit; a retry finds it in place.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from fleet.db import Database, database_unavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class CommitFailed(RuntimeError):
    """The batch transaction did not commit; nothing of it is stored, the caller may retry."""


class GroupCommitter:
    """Single writer thread that commits queued ``fn(session)`` calls in batches."""

    def __init__(self, db: Database, max_batch: int = 256, name: str = "fleet-committer",
                 before_commit: Callable[[], None] | None = None) -> None:
        self.db = db
        self.max_batch = max_batch
        self.before_commit = before_commit
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._name = name
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[Session], T], timeout: float = 60.0) -> T:
        """Run ``fn`` inside the next batch transaction; return its result once committed.

        Exceptions raised by ``fn`` (e.g. ``IntegrityError``) come back to the caller; a
        failed commit, or a database that is unavailable (``database_unavailable``), raises
        ``CommitFailed``.
        """
        if not self.running:
            raise CommitFailed("the gateway's database writer is not running")
        future: Future[T] = Future()
        self._queue.put((fn, future))
        return future.result(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[Session], Any], Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            if self.before_commit is not None:
                self.before_commit()  # before the write lock: a slow sync does not hold it
            # A batch of one needs no SAVEPOINT: its failure rolls back the whole transaction.
            # Under steady load most batches hold one request, and the SAVEPOINT and its
            # RELEASE were two of the five statements of its transaction.
            alone = len(batch) == 1
            with self.db.writer_turn(), self.db.write() as session:
                for fn, future in batch:
                    try:
                        if alone:
                            result = fn(session)
                        else:
                            with session.begin_nested():
                                result = fn(session)
                        outcomes.append((future, result, None))
                    except Exception as exc:  # handed back to that one caller (but see below)
                        if database_unavailable(exc):
                            raise  # not this caller's data: the batch cannot commit now
                        outcomes.append((future, None, exc))
                        if alone:
                            session.rollback()  # nothing of it may be committed
                session.commit()
        except Exception as exc:
            logger.exception("group commit of %d writes failed", len(batch))
            # The driver's message names the database server: for the log, not for clients.
            why = ("the gateway's database is unavailable" if database_unavailable(exc)
                   else f"commit failed: {exc}")
            for _fn, future in batch:
                if not future.done():
                    future.set_exception(CommitFailed(why))
            return
        self.batches += 1
        self.items += len(batch)
        for future, result, error in outcomes:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
