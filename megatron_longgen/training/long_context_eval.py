"""The trainer's periodic long-context retrieval eval (`eval.long_context_interval`).

Passkey / needle-in-a-haystack samples (`evaluation.long_context`, the same samples at every eval) are scored
by one teacher-forced forward each through the training model itself, under its TP x PP x CP layout: a
sample is correct when the argmax of every answer position's logits is the answer token (what greedy
decoding would produce). Nothing of [T, V] size is gathered:

- TP: each rank holds a vocabulary slice of the logits; per answer position the ranks exchange their slice's
  (max, first argmax) and the first maximum wins, as `torch.argmax` over the whole vocabulary picks it.
- CP: each rank holds its zig-zag chunks of the positions; the per-sample counts are summed over CP.
- PP: the forward-only schedule runs the sample through the stages; the counts exist on the last stage.
- DP: samples are dealt round-robin over the DP ranks and the counts summed over DP.

`LongContextEval.run()` is collective over the whole job and returns the metrics
(`eval/passkey_acc`, `eval/passkey_acc_<length>`, ...) on every rank of the last pipeline stage.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_longgen.evaluation.long_context import build_long_context_samples
from megatron_longgen.evaluation.scoring import accuracy_table, metrics_for_logging


def first_argmax_across_ranks(local_logits_NV: torch.Tensor, *, group, vocab_offset: int) -> torch.Tensor:
    """Global argmax [N] of logits whose vocabulary dimension is split over `group` (rank r holds the
    slice starting at `vocab_offset`, slices in rank order); ties go to the lowest vocabulary index."""
    local_max, local_idx = local_logits_NV.float().max(dim=-1)
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return local_idx + vocab_offset
    maxes = [torch.empty_like(local_max) for _ in range(size)]
    idxs = [torch.empty_like(local_idx) for _ in range(size)]
    dist.all_gather(maxes, local_max.contiguous(), group=group)
    dist.all_gather(idxs, (local_idx + vocab_offset).contiguous(), group=group)
    maxes_RN, idxs_RN = torch.stack(maxes), torch.stack(idxs)
    best = maxes_RN.max(dim=0).values
    # The first rank (lowest vocabulary slice) reaching the maximum; its local argmax is the first there.
    first_rank = (maxes_RN == best).int().argmax(dim=0)
    return idxs_RN.gather(0, first_rank[None]).squeeze(0)


def _forward(data_iterator, model, *, device, cp_shard):
    batch = cp_shard(next(data_iterator))
    logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
    return logits, partial(_count_correct, batch["labels"].to(device), batch["loss_mask"].to(device))


def _count_correct(labels_BS, mask_BS, logits_BSV):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    offset = ps.get_tensor_model_parallel_rank() * logits_BSV.shape[-1]
    keep = mask_BS.bool()
    argmax = first_argmax_across_ranks(logits_BSV[keep], group=group, vocab_offset=offset)
    counts = torch.stack([(argmax == labels_BS[keep]).sum(), keep.sum()]).double()
    return torch.zeros((), device=logits_BSV.device), {"counts": counts}


class LongContextEval:
    """Fixed samples (`from_config`: the run's `eval.long_context_*`); `run(trainer)` scores them with the
    current weights."""

    def __init__(self, samples):
        self.samples = list(samples)

    @classmethod
    def from_config(cls, cfg, tokenizer) -> LongContextEval:
        return cls(build_long_context_samples(cfg.eval, tokenizer, seq_length=cfg.train.seq_length))

    @staticmethod
    def batch(sample) -> dict[str, torch.Tensor]:
        """The trainer's micro-batch layout for one sample: next-token labels, the loss mask on the answer
        positions (those whose logits predict an answer token)."""
        ids = torch.tensor(sample.input_ids, dtype=torch.long)
        labels = torch.cat([ids[1:], ids[:1]])  # the last position's label is never scored
        mask = torch.zeros(len(ids), dtype=torch.float32)
        positions = sample.answer_logit_positions
        mask[positions.start : positions.stop] = 1.0
        return {"tokens": ids[None], "labels": labels[None], "loss_mask": mask[None],
                "position_ids": torch.arange(len(ids))[None]}  # fmt: skip

    @torch.no_grad()
    def run(self, trainer) -> dict[str, float] | None:
        """Collective: the accuracy metrics on the last pipeline stage's ranks, None elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        pgs = trainer.pgs
        last_stage = trainer.pp_rank == trainer.pp_size - 1
        counts = torch.zeros(len(self.samples), 2, dtype=torch.float64, device=trainer.device)
        for m in trainer.model:
            m.eval()
        try:
            for i in range(trainer.dp_rank, len(self.samples), trainer.dp_size):
                sample = self.samples[i]
                out = get_forward_backward_func()(
                    forward_step_func=partial(_forward, device=trainer.device, cp_shard=trainer._cp_shard),
                    data_iterator=[iter([self.batch(sample)]) for _ in trainer.model]
                    if len(trainer.model) > 1
                    else iter([self.batch(sample)]),
                    model=trainer.model if len(trainer.model) > 1 else trainer.model[0],
                    num_microbatches=1,
                    seq_length=sample.length,
                    micro_batch_size=1,
                    forward_only=True,
                )
                if last_stage:
                    counts[i] = out[0]["counts"].to(counts)
        finally:
            for m in trainer.model:
                m.train()
        if not last_stage:
            return None
        dist.all_reduce(counts, group=pgs.dp_cp)  # CP: positions split; DP: samples split
        correct = [bool(c[0] == c[1] and c[1] > 0) for c in counts.tolist()]
        return metrics_for_logging(accuracy_table(self.samples, correct), prefix="eval")
