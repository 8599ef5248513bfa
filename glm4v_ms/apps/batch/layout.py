"""Where a process sits in a batch job: data-parallel shards, model-parallel (tensor / expert) groups sharing one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .requests import JobError


@dataclass
class Layout:
    """Where this process sits in the job. ``rank``/``world``: global (one process per card); ``dp_rank``/``dp_size``:
    the data-parallel shard this process works on; ``writer``: whether it writes that shard's part file."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    writer: bool = True
    launcher: str = "single"  # "msrun" (mindspore.communication is initialised), "flags" (--rank/--world_size)
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def coordinator(self) -> bool:
        """The process that shows the progress bar and merges the output."""
        return self.writer and self.dp_rank == 0

    def owns(self, index: int) -> bool:
        """Whether request ``index`` belongs to this process's shard."""
        return index % self.dp_size == self.dp_rank


def make_layout(rank: int, world: int, local_rank: int = 0, launcher: str = "single", tp: int = 1,
                barrier: Optional[Callable[[], None]] = None, ep: int = 1) -> Layout:
    """The data-parallel view of a process. With model parallelism (tensor parallelism over ``tp``, expert
    parallelism over ``ep``; one group of max(tp, ep) consecutive ranks), the ranks of a group share one shard
    (``dp_rank = rank // group``) and only the group's first rank writes (batch_infer --tp / --ep); with a group of
    1 every rank is the writer of its own shard."""
    if world < 1 or not 0 <= rank < world:
        raise JobError(f"rank {rank} is outside a world of {world} process(es)")
    if tp < 1 or ep < 1:
        raise JobError(f"tensor-parallel size {tp} and expert-parallel size {ep} must be >= 1")
    group = max(tp, ep)
    if world % group:
        what = "tensor-parallel size" if tp >= ep else "expert-parallel size"
        raise JobError(f"the world size {world} is not a multiple of the {what} {group} (each model-parallel group "
                       "is max(--tp, --ep) consecutive ranks)")
    return Layout(rank=rank, world=world, local_rank=local_rank, dp_rank=rank // group, dp_size=world // group,
                  writer=rank % group == 0, launcher=launcher, barrier=barrier or (lambda: None))
