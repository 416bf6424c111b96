"""Which rows run at the next denoising step: continuous batching for one pipeline.

Pure Python, no torch: a row is one image of a request, and rows join and leave the running
batch between steps (as Orca and vLLM do for tokens). The rules, in order:

- **Bounds.** At most `max_batch_images` rows run at once.
- **Shared shape.** Rows of one batch share their `group` (everything one UNet call must share:
  the base model, the image size, the scheduler type). A row of another group waits until the
  running batch has drained, then starts the next batch.
- **Adapter slots.** The distinct adapters of a batch never exceed `max_adapters` (the
  pipeline's slots); a row needs one slot per adapter it combines that the batch does not hold
  yet (none for the base model). A row that would need more waits; one that combines more
  adapters than there are slots can never run, and is refused by `add`.
- **Order.** Admission is first come, first served: the first waiting row that cannot join
  stops the rows behind it from joining, so a row of a rare size or a new adapter is never
  starved by a stream of rows that could have joined.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Row:
    """One image waiting or running. `request` and `state` are the engine's; the scheduler reads
    only `group`, `adapters` and `enqueued_at`."""

    request: Any
    index: int
    group: Hashable
    adapters: tuple[str, ...]  # the adapter ids it combines (none: the base model)
    enqueued_at: float
    state: Any = field(default=None, repr=False)


class BatchScheduler:
    """The waiting queue and the running batch. Not thread-safe: one caller (the engine loop,
    under its lock) at a time."""

    def __init__(self, max_batch_images: int, max_adapters: int) -> None:
        if max_batch_images < 1:
            raise ValueError(f"max_batch_images must be at least 1, got {max_batch_images}")
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.max_batch_images = max_batch_images
        self.max_adapters = max_adapters
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []

    def add(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        for row in rows:
            if len(set(row.adapters)) > self.max_adapters:
                raise ValueError(
                    f"a row combines {len(set(row.adapters))} adapters; this pipeline has "
                    f"{self.max_adapters} adapter slots"
                )
        self.waiting.extend(rows)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def adapters_running(self) -> set[str]:
        return {adapter for row in self.running for adapter in row.adapters}

    def admit(self) -> list[Row]:
        """Move the rows that join at the next step from the queue to the batch; return them."""
        admitted: list[Row] = []
        if not self.waiting:
            return admitted
        group = self.running[0].group if self.running else self.waiting[0].group
        adapters = self.adapters_running()
        while self.waiting and len(self.running) < self.max_batch_images:
            row = self.waiting[0]
            if row.group != group:
                break
            if len(adapters | set(row.adapters)) > self.max_adapters:
                break
            self.waiting.popleft()
            self.running.append(row)
            admitted.append(row)
            adapters.update(row.adapters)
        return admitted

    def finish(self, rows: Iterable[Row]) -> None:
        """Take rows out of the batch (done, failed or dropped)."""
        gone = {id(row) for row in rows}
        self.running = [row for row in self.running if id(row) not in gone]

    def drop(self, leaves: Callable[[Row], bool]) -> list[Row]:
        """Remove every row, waiting or running, for which `leaves(row)` is true; return the
        running ones among them (the engine releases what they held)."""
        self.waiting = deque(row for row in self.waiting if not leaves(row))
        gone = [row for row in self.running if leaves(row)]
        self.finish(gone)
        return gone
