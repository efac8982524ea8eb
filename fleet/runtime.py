"""The gateway's process-wide state: database, frame store, limiter, group committer, stats,
model store and the request-path caches (``fleet.caches``)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request

from fleet import migrations
from fleet.caches import AuthCache, ManifestCache, ModelPublicKey
from fleet.committer import GroupCommitter
from fleet.config import GatewaySettings
from fleet.db import Database
from fleet.denials import DenialLog
from fleet.jpeg import DecodePool
from fleet.key_locks import KeyLocks
from fleet.metrics import EventsCollector, FleetCollector, GatewayMetrics
from fleet.models_store import ModelStore
from fleet.ratelimit import KnownTokens, TokenBucketLimiter
from fleet.reconcile import reconcile_frame_store
from fleet.reconcile_objects import reconcile_object_store
from roadloop.data.object_frames import S3FrameStore, open_frame_store
from roadloop.data.s3_client import S3Timeouts
from roadloop.fsutil import ext4_without_journal

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class GcPauses:
    """The cyclic garbage collector's pauses, as spans ``gc_gen0``..``gc_gen2``.

    A collection holds the GIL, so a long one stalls every upload in flight on that worker:
    beside ``commit_wait`` and ``decode`` in ``GET /v1/stats`` it says whether a latency tail
    was the collector. A callback per collection (``gc.callbacks``), on while the gateway runs.
    The callback takes no lock: a collection can start inside any allocation, also one made
    by a thread that holds ``Stats``'s lock, and would wait for itself.
    """

    def __init__(self) -> None:
        self._spans = [[0.0, 0, 0.0] for _ in range(3)]  # per generation: sum s, count, max s
        self._t0 = 0.0  # collections never overlap: the collecting thread holds the GIL

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0:
            dt = time.perf_counter() - self._t0
            self._t0 = 0.0
            s = self._spans[min(info.get("generation", 0), 2)]
            s[0] += dt
            s[1] += 1
            s[2] = max(s[2], dt)

    def start(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def spans(self) -> dict[str, list[float]]:
        return {f"gc_gen{g}": list(s) for g, s in enumerate(self._spans) if s[1]}


def freeze_startup_objects() -> int:
    """Collect once, then move every object still alive into the collector's permanent
    generation (``gc.freeze``); returns how many. A served worker holds ~140,000 tracked
    objects after start-up (modules, FastAPI routes, SQLAlchemy and pydantic machinery) that
    live as long as it does, and each full collection walked them all with the GIL held:
    40-45 ms alone, 67-79 ms under load (``gc_gen2`` in ``GET /v1/stats``;
    benchmarks/results/gc-freeze-kept/), a stall of every upload in flight on the worker.
    Objects made later are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class _Span:
    """One timed block of ``Stats.span``. A class, not a ``@contextmanager`` generator: a
    stored frame opens about eight spans, and the generator's set-up and teardown cost about
    1 µs more each (``timeit``: 2.2 against 1.2 µs a span)."""

    __slots__ = ("_name", "_stats", "_t0")

    def __init__(self, stats: Stats, name: str) -> None:
        self._stats = stats
        self._name = name

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._stats.add_span(self._name, time.perf_counter() - self._t0)


class Stats:
    """Counters and timing spans (sum, count, max) — cheap enough to leave on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, int] = defaultdict(int)
        self.spans: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])
        self.listener: Callable[[str, int], None] | None = None  # also told of every count
        self.gc = GcPauses()  # started and stopped with the gateway

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n
        if self.listener is not None:
            self.listener(name, n)

    def span(self, name: str) -> _Span:
        """``with stats.span(name):`` times the block (raised or not) into ``spans[name]``."""
        return _Span(self, name)

    def add_span(self, name: str, dt: float) -> None:
        """Record one timed block of ``dt`` seconds."""
        with self._lock:
            s = self.spans[name]
            s[0] += dt
            s[1] += 1
            s[2] = max(s[2], dt)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            counters, spans = dict(self.counters), {k: list(v) for k, v in self.spans.items()}
        spans.update(self.gc.spans())
        return {
            "counters": counters,
            "spans_ms": {
                k: {
                    "count": int(v[1]),
                    "mean_ms": round(v[0] / v[1] * 1000, 3) if v[1] else 0.0,
                    "max_ms": round(v[2] * 1000, 3),
                    "total_s": round(v[0], 3),
                }
                for k, v in spans.items()
            },
        }


class CacheSweeper:
    """Sweeps an object store's local image cache (``S3FrameStore.sweep_cache``) on a timer,
    so images unused for ``frame_cache_ttl_s`` (an erased frame's among them: no replica
    asks for it again) leave this replica's disk even when nothing here reads frames. The
    sweep itself runs at most once per ``sweep_interval_s`` per cache folder, whichever of
    the node's worker processes (or a read) gets to it first."""

    def __init__(self, store: S3FrameStore) -> None:
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None or self.store.sweep_interval_s is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="image-cache-sweep",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.store.sweep_interval_s is not None
        while True:
            try:
                self.store.sweep_cache()
            except Exception:  # a failed sweep is retried: it never ends the timer
                logger.exception("image cache sweep of %s failed", self.store.root)
            if self._stop.wait(self.store.sweep_interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class Gateway:
    """Everything a request handler needs; one per app."""

    def __init__(self, settings: GatewaySettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or utc_now
        assert settings.database_url is not None and settings.frame_store is not None
        self.db = Database(
            settings.database_url,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            max_overflow=settings.worker_threads,
        )
        # A folder, or S3-compatible object storage shared by all replicas (images read
        # back through the local folder as a cache, swept of images unused for
        # frame_cache_ttl_s; the client with short timeouts: docs/storage.md).
        self.store = open_frame_store(settings.frame_store_url or settings.frame_store,
                                      cache_dir=settings.frame_store,
                                      endpoint_url=settings.s3_endpoint_url,
                                      timeouts=S3Timeouts(settings.s3_connect_timeout_s,
                                                          settings.s3_read_timeout_s,
                                                          settings.s3_max_attempts),
                                      cache_ttl_s=settings.frame_cache_ttl_s)
        self.cache_sweeper = (CacheSweeper(self.store) if isinstance(self.store, S3FrameStore)
                              else None)
        # With several worker processes each holds its own buckets: give each its share, so a
        # device never exceeds the configured rate in total. A device's bucket in a worker
        # still holds one whole batch (``max_batch_frames``, up to the configured burst): a
        # device keeps its one connection on one worker, and agents send full batches when
        # they drain a backlog, so a quarter of the default burst (25 of 100, four workers)
        # would refuse the last 7 frames of every full batch of 32 from a rested device. A
        # device spreading connections over every worker may then burst to workers x one
        # batch (128 with the defaults, not 100); its rate stays the configured one.
        share = max(1, settings.workers)
        device_burst = max(settings.rate_limit_burst // share,
                           min(settings.rate_limit_burst, settings.max_batch_frames))
        self.limiter = TokenBucketLimiter(settings.rate_limit_per_s / share, max(1, device_burst))
        # Unattributed requests per address and overall (fleet.ratelimit.UnattributedLimit).
        self.address_limiter = TokenBucketLimiter(
            settings.address_rate_limit_per_s / share,
            max(1, settings.address_rate_limit_burst // share),
            max_keys=settings.address_table_size,
        )
        self.unattributed_limiter = TokenBucketLimiter(
            settings.unattributed_rate_limit_per_s / share,
            max(1, settings.unattributed_rate_limit_burst // share),
        )
        self.known_tokens = KnownTokens(settings.known_tokens_size)
        # frame_sync=group: one frame-store sync per group commit, before its transaction.
        self.committer = GroupCommitter(
            self.db, settings.commit_batch_max,
            before_commit=self._sync_frames if settings.frame_sync == "group" else None)
        self.denials = DenialLog(self.db, self.now, settings.denial_audit_window_s)
        self.stats = Stats()
        self.metrics = GatewayMetrics()
        if self.metrics.multiprocess:  # summed over the workers' files (fleet.metrics)
            self.stats.listener = self.metrics.count_event
        else:
            self.metrics.add_collector(EventsCollector(lambda: dict(self.stats.counters)))
        self.metrics.add_collector(FleetCollector(self.db))
        assert settings.models_dir is not None
        self.models = ModelStore(settings.models_dir)
        self.model_key = ModelPublicKey(settings.model_public_key_file)
        self.auth_cache: AuthCache[Any] = AuthCache(self.db)  # principals of fleet.auth
        self.manifests = ManifestCache(self.db)
        self.frame_locks = KeyLocks()
        # JPEG decodes at once, on their own threads (fleet.jpeg): bounds an upload burst's memory.
        self.decoders = DecodePool(settings.max_concurrent_decodes or 1)

    def _sync_frames(self) -> None:
        with self.stats.span("frame_sync"):
            self.store.sync()

    def now(self) -> datetime:
        return self.clock()

    def prepare_storage(self) -> None:
        """Upgrade the database schema to head and repair the frame store after a crash (once,
        before serving; ``fleet.migrations`` serializes concurrent upgrades)."""
        migrations.upgrade(self.db)
        assert self.settings.frame_store is not None
        self.settings.frame_store.mkdir(parents=True, exist_ok=True)
        if self.store.is_local and ext4_without_journal(self.settings.frame_store):
            logger.warning(
                "the frame store %s is on ext4 without a journal: for a few minutes after a "
                "mass deletion (retention) every new frame file walks past the freed inodes "
                "(milliseconds a file), and after a power cut the file system needs a full "
                "e2fsck; put the frame store on a journaled file system (docs/capacity.md)",
                self.settings.frame_store)
        if not self.settings.reconcile_on_start:
            return
        if isinstance(self.store, S3FrameStore):
            objects = reconcile_object_store(
                self.db, self.store, self.now,
                grace=timedelta(seconds=self.settings.reconcile_orphan_grace_s),
                max_objects=self.settings.reconcile_max_objects)
            logger.info("object frame store reconciled: %s", objects)
        elif self.store.is_local:
            report = reconcile_frame_store(self.db, self.store, self.now)
            logger.info("frame store reconciled: %s", report)

    def start(self, *, freeze_gc: bool = False) -> None:
        """Prepare storage, start the writer thread; with ``freeze_gc`` (a process serving this
        one gateway) freeze what start-up made (``freeze_startup_objects``) before the
        collector's pauses are timed, so that one collection is not counted as a stall."""
        self.prepare_storage()
        self.committer.start()
        self.denials.start()
        if self.cache_sweeper is not None:
            self.cache_sweeper.start()
        if freeze_gc:
            frozen = freeze_startup_objects()
            logger.info("%d start-up objects frozen out of the garbage collector", frozen)
        self.stats.gc.start()
        logger.info(
            "fleet gateway ready: db=%s frames=%s", self.db.url,
            self.settings.frame_store_url or self.settings.frame_store,
        )

    def stop(self) -> None:
        self.stats.gc.stop()
        if self.cache_sweeper is not None:
            self.cache_sweeper.stop()
        self.denials.stop()  # writes the refusals counted since the last window
        self.committer.stop()
        self.decoders.close()
        self.db.dispose()


def get_gateway(request: Request) -> Gateway:
    """The app's ``Gateway``."""
    return request.app.state.gateway


async def gateway_dependency(request: Request) -> Gateway:
    """FastAPI dependency: the app's ``Gateway``. ``async`` because FastAPI runs a plain
    ``def`` dependency in its thread pool: a hand-off to a worker thread and back for every
    request, to read one attribute."""
    return get_gateway(request)


GatewayDep = Annotated[Gateway, Depends(gateway_dependency)]
