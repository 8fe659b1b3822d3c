"""recompute.PinnedPool: offload's pinned host buffers are reused only after their last reader's
event, in size classes at most 1/8 larger than asked, and idle ones beyond the peak in use are
freed. The real pinned memory and CUDA events are exercised by the GPU offload test in
test_arb_model.py; here plain CPU tensors and hand-set events check the bookkeeping."""
import pytest
import torch

from arbd.model.recompute import PinnedPool


class Event:
    def __init__(self, done: bool = False) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def _pool() -> PinnedPool:
    return PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1, 3 * 10**7 + 17])
def test_size_class_covers_the_request_within_an_eighth(nbytes):
    size = PinnedPool.size_class(nbytes)
    assert size >= nbytes
    assert size <= nbytes + max(4095, nbytes // 8), (nbytes, size)
    assert PinnedPool.size_class(size) == size   # a class is its own class


def test_a_buffer_comes_back_only_after_its_event():
    pool = _pool()
    a, b = pool.take(100_000), pool.take(100_000)
    ev = Event(done=False)
    pool.give(a, ev)
    pool.give(b, Event(done=False))
    c = pool.take(100_000)          # a and b are still being read: a new buffer
    assert c.data_ptr() not in (a.data_ptr(), b.data_ptr()) and pool.allocations == 3
    ev.done = True
    d = pool.take(99_000)           # the same size class, and a's reader has finished
    assert d.data_ptr() == a.data_ptr() and pool.allocations == 3
    e = pool.take(400_000)          # another class: a new buffer even though b waits idle
    assert e.data_ptr() not in (a.data_ptr(), b.data_ptr(), c.data_ptr()) and pool.allocations == 4


def test_steady_state_allocates_nothing_new():
    pool = _pool()
    sizes = [3 << 20, 5 << 20, 1 << 20, 3 << 20]
    for step in range(5):
        bufs = [pool.take(n) for n in sizes]
        for b in bufs:
            pool.give(b, Event(done=True))
        if step == 0:
            first = pool.allocations
    assert first == len(sizes) and pool.allocations == first
    assert pool.in_use == 0


def test_idle_buffers_beyond_the_peak_in_use_are_freed_oldest_first():
    pool = _pool()
    held = [pool.take(1 << 20) for _ in range(3)]
    peak = pool.peak_in_use
    for b in held:
        pool.give(b, None)
    assert pool.idle_bytes() == peak
    # Other sizes later: their buffers push the oldest idle ones out, never past the peak.
    for n in (2 << 20, 3 << 20, 5 << 20):
        pool.give(pool.take(n), None)
        assert pool.idle_bytes() <= pool.peak_in_use
    assert all(b.data_ptr() not in [h.data_ptr() for h in held] for b, _ in pool._idle[-1:])
