"""The process-group mesh: data parallel x tensor parallel, expert parallel inside data parallel,
and the codebook group.

Rank layout (tp innermost, so a tensor-parallel group sits on neighbouring GPUs of one node):

    rank = dp_index * tp + tp_index

- tp group: the tp ranks of one dp index (MLA heads are split over it).
- dp group: the ranks with the same tp index (float gradients and ternary evidence are reduced
  over it; DeepSpeed sees it through the `mpu` methods below).
- ep group: `ep` consecutive dp indices with the same tp index (experts are split over it, as in
  DeepSpeed's MoE, where expert parallelism is carved out of data parallelism).
- expert-dp group: the ranks holding the same experts (same tp index, same dp_index % ep).
- codebook group: `cb` consecutive ranks (default: the whole world) over which the codebook rows
  are split.

Every rank creates every group in the same order (torch.distributed requires it) and keeps the
ones it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    ep: int = 1
    cb: int = 0   # codebook shards; 0 means the whole world

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the field and a fix if this layout cannot run on world_size."""
        for name in ("dp", "tp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"layout.{name} must be a positive int, got {v!r}")
        if self.world != world_size:
            raise ValueError(f"layout dp x tp = {self.dp} x {self.tp} = {self.world} does not match "
                             f"the world size {world_size}: set dp = {world_size // self.tp} "
                             f"(if tp divides it) or launch {self.world} ranks")
        if self.dp % self.ep:
            raise ValueError(f"layout.ep = {self.ep} must divide dp = {self.dp}: experts are split "
                             f"over data-parallel ranks; choose ep in {_divisors(self.dp)}")
        cb = self.cb or world_size
        if cb < 1 or world_size % cb:
            raise ValueError(f"layout.cb = {self.cb} must divide the world size {world_size}; "
                             f"choose one of {_divisors(world_size)} (0 = the whole world)")

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_index, tp_index) of a rank."""
        return divmod(rank, self.tp)

    # Rank lists of every group, for every rank: pure functions, easy to test without processes.
    def tp_groups(self) -> list[list[int]]:
        return [[d * self.tp + t for t in range(self.tp)] for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[d * self.tp + t for d in range(self.dp)] for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        return [[(blk * self.ep + e) * self.tp + t for e in range(self.ep)]
                for t in range(self.tp) for blk in range(self.dp // self.ep)]

    def expert_dp_groups(self) -> list[list[int]]:
        return [[(blk * self.ep + e) * self.tp + t for blk in range(self.dp // self.ep)]
                for t in range(self.tp) for e in range(self.ep)]

    def cb_groups(self) -> list[list[int]]:
        cb = self.cb or self.world
        return [list(range(s, s + cb)) for s in range(0, self.world, cb)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Mesh:
    """The groups this rank belongs to, plus the methods DeepSpeed expects of an `mpu`."""

    def __init__(self, layout: Layout, rank: int | None = None) -> None:
        world = dist.get_world_size()
        layout.validate(world)
        self.layout = layout
        self.rank = dist.get_rank() if rank is None else rank
        self.dp_index, self.tp_index = layout.coords(self.rank)
        self.tp_group = self._mine(layout.tp_groups())
        self.dp_group = self._mine(layout.dp_groups())
        self.ep_group = self._mine(layout.ep_groups())
        self.expert_dp_group = self._mine(layout.expert_dp_groups())
        self.cb_group = self._mine(layout.cb_groups())

    def _mine(self, groups: list[list[int]]):
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if self.rank in ranks:
                mine = g
        return mine

    # -- DeepSpeed mpu interface (model parallel = tensor parallel here) ---------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_index

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_index

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group(self):
        return self.dp_group

    # DeepSpeed >= 0.10 also asks for these names.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
