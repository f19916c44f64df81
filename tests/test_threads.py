"""The kernels' helper threads: spinning between jobs, then sleeping; every item done once."""
import threading
import time

import numpy as np
import pytest
from numba import njit

from kvslim.kernels import threads
from kvslim.kernels.ggml import fetch_add, load_acquire


@njit(nogil=True, cache=True)
def _claim(flag, gen, linger, counters, hits, owner, work):
    """Claim items (counters[0]) until none is left; each item counted and its thread
    noted (owner: 1 on a helper, which lingers), after ``work`` steps of arithmetic (an
    item's cost)."""
    threads.job_begins(flag, gen)
    while True:
        w = fetch_add(counters, 0)
        if w >= hits.shape[0]:
            threads.job_ends(flag, gen, linger)
            return
        x = 1.0
        for i in range(work):
            x = x * 1.0000001 + 1e-9
        hits[w] += 1 if x > 0 else 2
        owner[w] = 1 if linger else 0
        fetch_add(counters, 1)


@njit(nogil=True, cache=True)
def _wait_all(counters, n):
    while load_acquire(counters, 1) < n:
        pass


def _job(h: threads.Helpers, n: int, work: int = 0) -> tuple[np.ndarray, np.ndarray]:
    counters, hits, owner = np.zeros(2, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64)
    h.run(_claim, (counters, hits, owner, work), min(h.n, n - 1), _wait_all, (counters, n))
    return hits, owner


@pytest.mark.parametrize("spin", [0.0, 300.0])
def test_every_item_runs_once_whether_helpers_spin_or_sleep(spin):
    h = threads.Helpers(1, "test-helpers", spin)
    for n in (1, 2, 7, 500, 20_000):
        for _ in range(20):
            hits, owner = _job(h, n)
            assert (hits == 1).all() and (owner >= 0).all()


def test_jobs_from_two_threads_queue_and_all_finish():
    h = threads.Helpers(1, "test-helpers", 300.0)
    errors = []

    def caller():
        try:
            for n in (3, 50, 4000) * 30:
                hits, _ = _job(h, n)
                assert (hits == 1).all()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=caller) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in ts)


def test_spin_setting_from_the_environment(monkeypatch):
    monkeypatch.delenv(threads.SPIN_ENV, raising=False)
    assert threads.spin_us() == threads.SPIN_US
    monkeypatch.setenv(threads.SPIN_ENV, "0")
    assert threads.spin_us() == 0
    monkeypatch.setenv(threads.SPIN_ENV, " 50 ")
    assert threads.spin_us() == 50
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv(threads.SPIN_ENV, bad)
        with pytest.raises(ValueError, match=threads.SPIN_ENV):
            threads.spin_us()


def test_a_spinning_helper_shares_jobs_one_after_another_and_runs_each_item_once():
    """Jobs of about a millisecond, posted one after another to a helper that spins
    between them: the helper runs part of the items, and every item runs once."""
    h = threads.Helpers(1, "test-helpers", 10_000.0)
    helper_items = 0
    for _ in range(300):
        hits, owner = _job(h, 64, 20_000)  # about 20 us an item
        assert (hits == 1).all()
        helper_items += int((owner == 1).sum())
    assert helper_items > 0


def test_a_job_is_visible_from_its_begin_and_a_helper_lingers_until_the_next():
    flag = np.array([5], np.int64)
    threads.job_begins(flag, 0)  # a job with no helpers: nothing to show
    threads.job_begins(flag, 3)  # a late helper of an older job: the flag stays
    assert flag[0] == 5
    threads.job_begins(flag, 6)
    assert flag[0] == 6
    threads.job_ends(flag, 6, 1000)  # no later job: returns after its reads
    threads.job_ends(flag, 5, 10**15)  # a later job has begun: returns at once


def _cpu_seconds(name: str) -> float:
    """CPU time so far of the one live thread called ``name``."""
    (t,) = [t for t in threading.enumerate() if t.name == name]
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


@pytest.mark.parametrize("linger", [True, False])
def test_a_job_without_linger_leaves_its_helper_asleep(linger):
    """After a linger=False job (a prefill tile, which torch's GEMM follows on every core)
    the helper sleeps instead of spinning: it takes no CPU time while the caller waits."""
    name = f"test-linger-{linger}"
    h = threads.Helpers(1, name, 500_000.0)  # would spin half a second after each job
    counters, hits, owner = np.zeros(2, np.int64), np.zeros(64, np.int64), np.full(64, -1, np.int64)
    h.run(_claim, (counters, hits, owner, 2000), 1, _wait_all, (counters, 64), linger=linger)
    assert (hits == 1).all()
    time.sleep(0.02)  # the helper has woken for the job and is spinning or asleep now
    before = _cpu_seconds(name)
    time.sleep(0.2)
    used = _cpu_seconds(name) - before
    if linger:
        assert used > 0.02, f"a lingering helper spun for only {used * 1e3:.1f} ms of 200"
    else:
        assert used < 0.01, f"the helper took {used * 1e3:.1f} ms of CPU while it should sleep"
