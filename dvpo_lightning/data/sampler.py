"""The training-order sampler of every DataModule: seeded, epoch by epoch, resumable."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler, Sampler


class EpochShuffleSampler(DistributedSampler):
    """A seeded permutation per epoch, split across processes, that remembers where it is.

    The order of epoch ``e`` depends only on ``(seed, e)`` and is the same on every process;
    process ``rank`` of ``world_size`` takes every ``world_size``-th index of it, so each global
    batch holds the same prompts whatever the number of processes, and a prompt's group of
    ``n`` responses is always made on one process. ``state_dict`` holds the epoch and the number
    of indices this process has handed out, so a resumed run continues with the next prompt.

    Indices are handed out in whole global batches: an epoch is the first
    ``n − n % (batch_size · world_size)`` indices of its permutation (like ``drop_last``). A new
    iterator starts the next epoch once the current one is handed out in full, whether or not
    the loader asked past its end (Lightning stops at ``len(loader)`` batches).

    It subclasses ``DistributedSampler`` only so that Lightning uses it as is instead of
    wrapping it (a wrapper would read it whole and lose the position).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, batch_size: int = 1,
                 world_size: int = 1, rank: int = 0) -> None:
        Sampler.__init__(self)
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank = world_size, rank
        global_batch = batch_size * world_size
        if n < global_batch:
            raise ValueError("one RL step takes data.init_args.batch_size × processes = "
                             f"{batch_size} × {world_size} = {global_batch} prompts, but the "
                             f"prompt file has only {n}. Fix: lower data.init_args.batch_size to "
                             f"at most {max(1, n // world_size)}, or add prompts")
        self.epoch_length = (n - n % global_batch) // world_size  # indices per process
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        return order[self.rank::self.num_replicas][: self.epoch_length]

    def __iter__(self):
        if self.position >= self.epoch_length:  # the previous epoch was handed out in full
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        while self.position < self.epoch_length:
            i = order[self.position]
            self.position += 1
            yield i

    def __len__(self) -> int:
        return self.epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its own epochs (they survive a resume exactly)."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
