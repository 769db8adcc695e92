"""The per-worker FIFO of clients waiting for a backend slot (prefork_proxy.waitqueue)."""

from __future__ import annotations

import threading

from prefork_proxy.waitqueue import WaitQueue


def test_first_in_first_out_skipping_the_cancelled():
    queue: WaitQueue[str] = WaitQueue(limit=10)
    tickets = {name: queue.push(name) for name in "abcde"}
    assert len(queue) == 5
    assert queue.cancel(tickets["b"]) and queue.cancel(tickets["d"])
    assert not queue.cancel(tickets["d"])  # once
    assert len(queue) == 3
    assert [queue.pop().waiter for _ in range(3)] == ["a", "c", "e"]
    assert queue.pop() is None and len(queue) == 0


def test_bounded_and_a_loser_goes_back_to_the_head():
    queue: WaitQueue[int] = WaitQueue(limit=3)
    assert all(queue.push(i) for i in range(3))
    assert queue.push(3) is None  # full: refused at once (503)
    first = queue.pop()
    assert first.waiter == 0 and not queue.cancel(first)  # popped: no longer waiting
    assert queue.push(4) is not None
    queue.push_front(first)  # it lost the slot to another worker: still first
    assert [queue.pop().waiter for _ in range(4)] == [0, 1, 2, 4]


def test_cancelled_tickets_do_not_pile_up():
    queue: WaitQueue[int] = WaitQueue(limit=10_000)
    keep = queue.push(-1)
    for i in range(5000):
        queue.cancel(queue.push(i))
    assert len(queue) == 1 and len(queue._entries) <= 2 * 1 + 64 + 1
    assert queue.pop() is keep


def test_every_waiter_is_popped_once_in_order_across_threads():
    """4 loops push (and cancel some of theirs) while another pops: once each, in order."""
    queue: WaitQueue[tuple] = WaitQueue(limit=100_000)
    barrier = threading.Barrier(5)
    cancelled = set()
    producing = [4]
    popped = []

    def produce(who: int) -> None:
        barrier.wait(timeout=10)
        for i in range(2000):
            ticket = queue.push((who, i))
            if i % 5 == 0 and queue.cancel(ticket):  # False: already popped
                cancelled.add((who, i))
        producing.append(-1)

    def consume() -> None:
        barrier.wait(timeout=10)
        while sum(producing) > 0 or len(queue):
            ticket = queue.pop()
            if ticket is not None:
                popped.append(ticket.waiter)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    threads.append(threading.Thread(target=consume))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(popped) == len(set(popped))
    assert set(popped) | cancelled == {(w, i) for w in range(4) for i in range(2000)}
    assert not set(popped) & cancelled
    for who in range(4):
        mine = [i for w, i in popped if w == who]
        assert mine == sorted(mine)  # each producer's order kept
