"""fleet.key_locks.KeyLocks: one lock per frame key, no false sharing, nothing left over."""

from __future__ import annotations

import threading

from fleet.key_locks import KeyLocks


def _users(locks: KeyLocks, key: str) -> int:
    with locks._mutex:
        entry = locks._locks.get(key)
        return entry[1] if entry else 0


def test_the_same_key_waits_and_nothing_is_left_over() -> None:
    locks = KeyLocks()
    inside = threading.Event()

    def second() -> None:
        with locks.hold(["cam/f1"]):
            inside.set()

    with locks.hold(["cam/f1", "cam/f2"]):
        t = threading.Thread(target=second)
        t.start()
        while _users(locks, "cam/f1") < 2:  # the second holder is waiting on the lock
            threading.Event().wait(0.001)
        assert not inside.is_set()
    t.join(30)
    assert inside.is_set() and len(locks) == 0


def test_distinct_keys_never_wait_on_each_other() -> None:
    """8192 keys held while another thread takes 8192 others: with keys striped over 4096
    locks some would share a stripe and the second thread would block."""
    locks = KeyLocks()
    done = threading.Event()

    def other() -> None:
        with locks.hold([f"cam-b/{i}" for i in range(8192)]):
            done.set()

    with locks.hold([f"cam-a/{i}" for i in range(8192)]):
        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert done.is_set()
    assert len(locks) == 0


def test_overlapping_sets_in_any_order_do_not_deadlock() -> None:
    locks = KeyLocks()
    keys = [f"cam/{i}" for i in range(50)]
    errors: list[BaseException] = []

    def worker(order: list[str]) -> None:
        try:
            for _ in range(200):
                with locks.hold(order):
                    pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(keys if i % 2 else keys[::-1],))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads) and len(locks) == 0
