"""The batch scheduler alone (pure Python): bounds, shared shape, adapter slots, order, leaving."""

from __future__ import annotations

import pytest

from serve.engine.scheduler import BatchScheduler, Row

SMALL = ("m", 32, 32, "DDIM")
LARGE = ("m", 64, 64, "DDIM")


def rows(request: str, n: int = 1, adapter: str | None = None, group=SMALL) -> list[Row]:
    adapters = () if adapter is None else tuple(adapter.split("+"))
    return [Row(request, i, group, adapters, 0.0) for i in range(n)]


def names(batch: list[Row]) -> list[tuple[str, int]]:
    return [(row.request, row.index) for row in batch]


def test_admits_up_to_the_bound_and_the_rest_wait():
    s = BatchScheduler(max_batch_images=3, max_adapters=4)
    s.add(rows("a", 2) + rows("b", 2))
    assert names(s.admit()) == [("a", 0), ("a", 1), ("b", 0)]
    assert names(s.waiting) == [("b", 1)]
    assert s.admit() == []  # full
    s.finish(s.running[:1])
    assert names(s.admit()) == [("b", 1)]  # joins the running batch at the next step
    assert len(s) == 3


def test_one_at_a_time_is_todays_behaviour():
    s = BatchScheduler(max_batch_images=1, max_adapters=4)
    s.add(rows("a", 2))
    assert names(s.admit()) == [("a", 0)] and s.admit() == []


def test_another_size_waits_for_the_batch_to_drain_and_blocks_rows_behind_it():
    s = BatchScheduler(max_batch_images=8, max_adapters=4)
    s.add(rows("a"))
    s.admit()
    s.add(rows("big", group=LARGE) + rows("c"))
    assert s.admit() == []  # "c" could join, but "big" came first
    s.finish(list(s.running))
    assert names(s.admit()) == [("big", 0)]  # its own batch, never refused
    assert s.admit() == []
    s.finish(list(s.running))
    assert names(s.admit()) == [("c", 0)]


def test_distinct_adapters_never_exceed_the_slots_and_base_rows_need_none():
    s = BatchScheduler(max_batch_images=8, max_adapters=2)
    s.add(rows("a", adapter="x") + rows("b", adapter="y") + rows("c") + rows("d", adapter="x"))
    s.add(rows("e", adapter="z") + rows("f", adapter="x"))
    assert names(s.admit()) == [("a", 0), ("b", 0), ("c", 0), ("d", 0)]
    assert s.adapters_running() == {"x", "y"}
    # "e" needs a third adapter: it waits, and "f" behind it waits too (first come, first served).
    assert s.admit() == []
    s.finish([r for r in s.running if r.adapters == ("y",)])
    assert names(s.admit()) == [("e", 0), ("f", 0)]
    assert s.adapters_running() == {"x", "z"}


def test_a_row_combining_adapters_needs_a_slot_for_each_the_batch_does_not_hold():
    s = BatchScheduler(max_batch_images=8, max_adapters=3)
    s.add(rows("a", adapter="x+y") + rows("b", adapter="y") + rows("c", adapter="x+y+z"))
    s.add(rows("d", adapter="w") + rows("e"))
    # x, y, z fill the three slots; "d" needs a fourth and waits, "e" behind it too.
    assert names(s.admit()) == [("a", 0), ("b", 0), ("c", 0)]
    assert s.adapters_running() == {"x", "y", "z"}
    assert s.admit() == []
    s.finish([r for r in s.running if "z" in r.adapters])
    assert names(s.admit()) == [("d", 0), ("e", 0)]  # x, y, w
    assert s.adapters_running() == {"x", "y", "w"}
    s.add(rows("f", adapter="x+w"))  # needs nothing new: joins a full set of slots
    assert names(s.admit()) == [("f", 0)]


def test_a_row_combining_more_adapters_than_slots_is_refused():
    s = BatchScheduler(max_batch_images=8, max_adapters=2)
    with pytest.raises(ValueError, match="3 adapters"):
        s.add(rows("a", adapter="x+y+z"))
    assert len(s) == 0


def test_drop_removes_waiting_and_running_rows_and_returns_the_running_ones():
    s = BatchScheduler(max_batch_images=2, max_adapters=2)
    s.add(rows("a", 2) + rows("b", 2))
    s.admit()
    gone = s.drop(lambda row: row.request == "a")
    assert names(gone) == [("a", 0), ("a", 1)]
    assert s.running == [] and names(s.waiting) == [("b", 0), ("b", 1)]
    s.admit()
    assert names(s.drop(lambda row: row.index == 1)) == [("b", 1)]
    assert names(s.running) == [("b", 0)] and not s.waiting


@pytest.mark.parametrize("batch, adapters", [(0, 1), (1, 0)])
def test_bounds_must_be_positive(batch, adapters):
    with pytest.raises(ValueError):
        BatchScheduler(batch, adapters)
