"""fleet.workers: each gateway worker's own SO_REUSEPORT listener, and the port check that
keeps a second gateway from joining the first one's listeners."""

from __future__ import annotations

import socket

import pytest

from fleet.workers import claim_port, reuse_port_socket, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="no SO_REUSEPORT here")


def test_a_port_in_use_is_refused_at_start() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            claim_port("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_workers_listen_together_and_other_servers_stay_out() -> None:
    held, port = claim_port("127.0.0.1", 0)
    assert port > 0
    listeners = [reuse_port_socket("127.0.0.1", port) for _ in range(2)]
    try:
        for sock in listeners:
            sock.listen()
        # a plain server (or a second gateway's probe) cannot take the port
        with pytest.raises(OSError):
            claim_port("127.0.0.1", port)
        # connections reach the listeners (the held socket never listens, so takes none)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(24)]
        accepted = 0
        for sock in listeners:
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted += 1
        for c in clients:
            c.close()
        assert accepted == 24
    finally:
        for sock in listeners:
            sock.close()
        held.close()


@pytest.mark.parametrize("bad", ["bogus", "", "REUSE_PORT", 1])
def test_worker_sockets_setting_is_checked(bad: object) -> None:
    from pydantic import ValidationError

    from fleet.config import GatewaySettings

    with pytest.raises(ValidationError, match="worker_sockets"):
        GatewaySettings(worker_sockets=bad)
