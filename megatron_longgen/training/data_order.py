"""Which samples a training step reads: a pure function of (seed, step), so resuming needs only the step.

Global sample `step * global_batch_size + i` is sample `order(step * global_batch_size + i)` of the dataset,
where `order` walks a fresh seeded permutation of the whole dataset per epoch. Data-parallel rank `r` of `D`
takes the contiguous share `[r * gbs / D, (r + 1) * gbs / D)` of each global batch and cuts it into
micro-batches.

Nothing here depends on `train.max_steps`: the dataset's size is fixed by the data and the sequence length
(`data/datasets.py`), so a run resumed with a larger step budget reads exactly the samples an uninterrupted
run with that budget would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class SampleOrder:
    """Deterministic global sample order: a fresh seeded permutation of the dataset per epoch."""

    def __init__(self, num_samples: int, *, seed: int):
        if num_samples < 1:
            raise ValueError(f"a dataset needs at least one sample, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def __call__(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        return int(self._perm[offset])


def micro_batches(
    dataset,
    order: SampleOrder,
    *,
    step: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this DP rank's micro-batches (dicts of [mbs, s] tensors) for optimizer step `step` (0-based)."""
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    for start in range(first, first + per_rank, micro_batch_size):
        samples = [dataset[order(i)] for i in range(start, start + micro_batch_size)]
        yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
