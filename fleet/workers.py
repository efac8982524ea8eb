"""Several gateway processes on one port, each with its own listening socket.

uvicorn's ``--workers N`` binds one socket in the parent and hands it to every worker; each
worker then accepts from the same queue, and a connection stays with whichever worker
accepted it. Agents keep their connection open (keep-alive) for hours, so the split is made
once and never corrected, and it is not even: with the intake benchmark's 32 agents on two
workers, ``ss -tnp`` showed **all 32 connections on one worker** (2026-11-27), which ran at its
one-core GIL limit while the other idled (the levers table of
benchmarks/results/gateway_intake.md has the rung that fixes it).

With ``worker_sockets="reuse_port"`` (the default where the platform has ``SO_REUSEPORT``)
every worker binds its own socket to the same address with ``SO_REUSEPORT``; the kernel then
gives each new connection to one of the listening sockets by a hash of its address and port
pair, so connections spread over the workers (binomially: 32 connections on 2 workers split
16 ± 3) whatever each worker is doing at the moment they arrive.

The parent keeps uvicorn's supervisor (``uvicorn.supervisors.Multiprocess``: health pings,
a dead worker restarted, signals handled), and binds the port itself first, *without*
``SO_REUSEPORT`` for a moment, so a port already taken — by another gateway too — is an
error at start, as it is with one shared socket, rather than a second server silently joining
the first one's group. It then holds a ``SO_REUSEPORT`` socket bound (never listening; the
kernel only gives connections to listening sockets) for as long as it runs, so the port stays
this gateway's while a dead worker is being replaced.

The workers start listening together: each builds its app, then waits (at most
``START_WAIT_S``) until every worker has built its own. A worker that listened first would
keep every agent that connects meanwhile — after a restart, all of them at once, since their
outboxes are full — for as long as those connections live: an imbalance nothing corrects.
A worker restarted later finds the others loaded and listens at once.

A worker that dies takes the connections waiting in its own accept queue with it (they are
reset; an agent re-sends what was not acknowledged), where a shared queue would have passed
them to the other workers.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import socket
from typing import Any, Literal

import uvicorn
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger(__name__)

WorkerSockets = Literal["reuse_port", "shared"]
START_WAIT_S = 60.0  # how long a starting worker waits for the others before it listens


def reuse_port_supported() -> bool:
    """Whether this platform load-balances ``SO_REUSEPORT`` listeners (Linux ≥ 3.9)."""
    return hasattr(socket, "SO_REUSEPORT") and socket.SO_REUSEPORT is not None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` with ``SO_REUSEPORT`` (not yet listening)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int) -> tuple[socket.socket, int]:
    """The port for this gateway's workers, checked free and then held.

    A plain bind (no ``SO_REUSEPORT``) fails when anything listens on the port, including
    another gateway's ``SO_REUSEPORT`` workers; it is closed and replaced at once by a
    ``SO_REUSEPORT`` socket the caller keeps bound. Port 0 resolves to the port the kernel
    picked, which every worker then binds."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    finally:
        probe.close()
    return reuse_port_socket(host, port), port


def _serve_on_own_socket(config: uvicorn.Config, host: str, port: int, loaded: Any,
                         all_loaded: Any, sockets: list[socket.socket] | None = None) -> None:
    """A worker's body: build the app, wait for the other workers to have built theirs (at
    most ``START_WAIT_S``; a worker restarted later finds them loaded), then listen on its
    own ``SO_REUSEPORT`` socket. Listening before the others would let every agent that
    connects in the meantime stay on the first workers for as long as its connection lives
    — after a restart, all of them at once."""
    config.load()
    with loaded.get_lock():
        loaded.value += 1
        if loaded.value >= config.workers:
            all_loaded.set()
    if not all_loaded.wait(START_WAIT_S):
        logger.warning("worker %d listens before all %d workers have loaded", os.getpid(),
                       config.workers)
    sock = reuse_port_socket(host, port)
    uvicorn.Server(config).run(sockets=[sock])


def run_workers(config: uvicorn.Config, sockets: WorkerSockets) -> None:
    """Serve ``config`` (``workers`` ≥ 2, an import string app) until SIGINT/SIGTERM."""
    if sockets == "shared" or not reuse_port_supported():
        if sockets == "reuse_port":
            logger.warning("SO_REUSEPORT is not available here: the workers share one socket")
        server = uvicorn.Server(config)
        Multiprocess(config, target=server.run, sockets=[config.bind_socket()]).run()
        return
    held, port = claim_port(config.host, config.port)
    try:
        logger.info("fleet gateway: %d workers, each listening on %s:%d (SO_REUSEPORT)",
                    config.workers, config.host, port)
        spawn = multiprocessing.get_context("spawn")  # uvicorn's workers are spawned
        target = functools.partial(_serve_on_own_socket, config, config.host, port,
                                   spawn.Value("i", 0), spawn.Event())
        Multiprocess(config, target=target, sockets=[]).run()
    finally:
        held.close()
