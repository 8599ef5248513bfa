"""The coordinator's progress over the whole job, read from every shard's part file as it grows."""

from __future__ import annotations

import time
from typing import Sequence

from .layout import Layout
from .parts import PartStore, part_path
from .requests import JobError


class Tracker:
    """Which pending requests (of every shard) have a current record by now; drives the progress bar."""

    def __init__(self, store: PartStore, pending: Sequence[int], done_before: int, layout: Layout,
                 enabled: bool = True):
        from ...progress import Progress

        self.store = store
        self.left = set(pending)
        self.errors = 0
        self.layout = layout
        self.bar = Progress(total=len(self.left), unit="req", desc="batch_infer", enabled=enabled)
        self.bar.postfix.update(before=done_before, errors=0, shards=layout.dp_size)
        self._last_poll = 0.0

    def _on_record(self, index: int, rid, is_error: bool) -> None:
        if index in self.left:
            self.left.discard(index)
            self.errors += is_error
            self.bar.n += 1

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < 1.0 and self.layout.dp_size > 1:
            return
        self._last_poll = now
        self.store.poll(self._on_record)
        self.bar.update(0, errors=self.errors)

    def wait(self, poll_s: float = 0.5) -> None:
        """Until every pending request has a record (the other shards' processes finish theirs). This process's
        own shard is finished and flushed by now: a request of it without a readable record is an error, not
        something to wait for."""
        self.update(force=True)
        lay = self.layout
        own = sorted(i for i in self.left if lay.owns(i))
        if own:
            raise JobError(f"{len(own)} result(s) of this process (first: input line {own[0]}) cannot be read back "
                           f"from {part_path(self.store.dir, lay.dp_rank)}; check the disk, then run again")
        while self.left:
            time.sleep(poll_s)
            self.update(force=True)

    def close(self) -> None:
        self.bar.close()
