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
    d = pool.take(a.numel() // 2)   # a fits, at most twice the request, and its reader is done
    assert d.data_ptr() == a.data_ptr() and pool.allocations == 3
    pool.give(d, Event(done=True))
    e = pool.take(a.numel() // 2 - 1)   # a would be more than twice the request: a new one
    assert e.data_ptr() != a.data_ptr() and pool.allocations == 4
    f = pool.take(a.numel() + 1)    # a is too small: a new buffer
    assert f.data_ptr() != a.data_ptr() and pool.allocations == 5


def test_the_smallest_fitting_buffer_is_taken():
    pool = _pool()
    big, mid = pool.take(190_000), pool.take(120_000)
    pool.give(big, None)
    pool.give(mid, None)
    assert pool.take(100_000).data_ptr() == mid.data_ptr()    # both fit: the smaller
    assert pool.take(big.numel() // 2).data_ptr() == big.data_ptr()
    assert pool.allocations == 2


def test_small_requests_reuse_the_smallest_class():
    pool = _pool()
    bufs = [pool.take(n) for n in (100, 3000, 1)]
    for b in bufs:
        pool.give(b, None)
    again = [pool.take(n) for n in (100, 3000, 1)]
    assert pool.allocations == 3 and {b.data_ptr() for b in again} == {b.data_ptr() for b in bufs}


def test_steady_state_allocates_nothing_new():
    pool = _pool()
    for step in range(5):
        # the ACT steps' inputs change size a little from micro-batch to micro-batch
        sizes = [(3 << 20) - step * 1000, 5 << 20, (1 << 20) + step * 1000, 3 << 20]
        bufs = [pool.take(n) for n in sizes]
        for b in bufs:
            pool.give(b, Event(done=True))
        if step == 0:
            first = pool.allocations
    assert first == 4 and pool.allocations == first
    assert pool.in_use == 0


def test_idle_buffers_beyond_twice_the_peak_in_use_are_freed_oldest_first():
    pool = _pool()
    held = [pool.take(1 << 20) for _ in range(3)]
    peak = pool.peak_in_use
    for b in held:
        pool.give(b, None)
    assert pool.idle_bytes() == peak
    # Larger requests later: their new buffers push the oldest idle ones out, never past 2x peak.
    for n in (5 << 20, 7 << 20, 9 << 20):
        pool.give(pool.take(n), None)
        assert pool.idle_bytes() <= 2 * pool.peak_in_use
    assert held[0].data_ptr() not in [b.data_ptr() for b, _ in pool._idle]
