"""Micro-batches of pair indices for one data-parallel rank, resumable from consumed_samples."""

from collections.abc import Iterator

import torch

from simpo_megatron.mathutil import ceil_div


class PairBatchSampler:
    """Yields this rank's micro-batches (lists of pair indices), epoch after epoch, forever.

    Each epoch orders the pairs by a permutation drawn from `torch.Generator` seeded with
    `seed + epoch` (the identity when `shuffle=False`), as Megatron's
    MegatronPretrainingRandomSampler does. Global batch g is entries
    [g * global_batch_size, (g + 1) * global_batch_size) of that order; data-parallel rank r
    takes the r-th contiguous slice of global_batch_size / data_parallel_size entries and splits
    it into micro-batches in order. The set of pairs in a global batch is therefore the same for
    every data-parallel size and micro-batch size, which is what keeps the loss (a mean over
    the global batch) identical across layouts.

    An epoch holds total_pairs rounded to a multiple of global_batch_size: down with
    `drop_last` (the leftover pairs change from epoch to epoch), up without it (the last batch
    is completed with pairs from the start of the same epoch). `consumed_samples` counts pairs
    over all ranks and resumes the stream exactly where it stopped; the caller stops it by
    iteration count.
    """

    def __init__(
        self,
        total_pairs: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        shuffle: bool = True,
        seed: int = 1234,
        drop_last: bool = True,
    ) -> None:
        for name, value in (
            ("micro_batch_size", micro_batch_size),
            ("global_batch_size", global_batch_size),
            ("data_parallel_size", data_parallel_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if global_batch_size % (micro_batch_size * data_parallel_size) != 0:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size "
                f"({micro_batch_size}) x data_parallel_size ({data_parallel_size})"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, {data_parallel_size}), got {data_parallel_rank}")
        if total_pairs < global_batch_size:
            raise ValueError(f"total_pairs ({total_pairs}) must be >= global_batch_size ({global_batch_size})")
        if consumed_samples < 0 or consumed_samples % global_batch_size != 0:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a non-negative multiple of "
                f"global_batch_size ({global_batch_size})"
            )
        self.total_pairs = total_pairs
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        batches_per_epoch = total_pairs // global_batch_size
        if not drop_last and total_pairs % global_batch_size:
            batches_per_epoch += 1
        self.pairs_per_epoch = batches_per_epoch * global_batch_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The pair indices of one epoch, pairs_per_epoch long, in consumption order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.total_pairs, generator=generator)
        else:
            order = torch.arange(self.total_pairs)
        if self.pairs_per_epoch > self.total_pairs:
            order = torch.cat([order, order[: self.pairs_per_epoch - self.total_pairs]])
        return order[: self.pairs_per_epoch]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.consumed_samples, self.pairs_per_epoch)
        per_rank = self.global_batch_size // self.data_parallel_size
        while True:
            order = self._epoch_order(epoch)
            for start in range(offset, self.pairs_per_epoch, self.global_batch_size):
                first = start + self.data_parallel_rank * per_rank
                shard = order[first : first + per_rank].tolist()
                for m in range(0, per_rank, self.micro_batch_size):
                    yield shard[m : m + self.micro_batch_size]
            epoch, offset = epoch + 1, 0


class OnePassBatchSampler:
    """Every pair of ``range(total_pairs)`` exactly once, in order, as this rank's micro-batches.

    For evaluation over a whole dataset: global batch g is entries [g * global_batch_size,
    (g + 1) * global_batch_size) clipped to total_pairs, sharded over data-parallel ranks and
    split into micro-batches as PairBatchSampler does. The last global batch may be partial, so
    a micro-batch may hold fewer than micro_batch_size pairs, or none; every rank still yields
    ``global_batch_size / (micro_batch_size x data_parallel_size)`` micro-batches per global
    batch, so all ranks run the same number of schedule steps (the caller pads short ones).
    """

    def __init__(
        self,
        total_pairs: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_pairs < 1:
            raise ValueError(f"total_pairs must be >= 1, got {total_pairs}")
        # The same layout checks as training's sampler (one pass, nothing consumed).
        PairBatchSampler(
            global_batch_size, 0, micro_batch_size, global_batch_size, data_parallel_rank, data_parallel_size
        )
        self.total_pairs = total_pairs
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.num_global_batches = ceil_div(total_pairs, global_batch_size)

    def __len__(self) -> int:
        return self.num_global_batches * self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.data_parallel_size
        for g in range(self.num_global_batches):
            first = g * self.global_batch_size + self.data_parallel_rank * per_rank
            for m in range(first, first + per_rank, self.micro_batch_size):
                yield list(range(m, min(m + self.micro_batch_size, self.total_pairs)))
