"""The training loop: Megatron-Core DDP + (distributed) optimizer + pipeline schedules, our data and logs.

One step = one global batch = `global_batch_size / (micro_batch_size * dp)` micro-batches per data-parallel
rank, run by Megatron's `get_forward_backward_func()` (no pipelining, 1F1B, or interleaved), then one
optimizer step (`optimizer_step.py`: clipping, and non-finite gradients caught by the norm it computes) and
the LR scheduler.

Losses are per-token (`calculate_per_token_loss`): each micro-batch returns (sum of token losses, token
count) and Megatron divides the gradients by the global token count, so the result does not depend on how
the batch is split over DP, CP or micro-batches.

Around the loop, each in its own module: the sample order (`data_order.py`, a pure function of seed and
step, so resuming needs only the step), the run directory's ownership (`run_dir.py`), what a resume must
share with its checkpoint (`resume_check.py`), the wall clock across restarts and step time without
evaluation/checkpoint time (`clock.py`), checkpoints (`checkpointing/`, and `trainer_checkpoints.py` for the
Trainer's save / restore), signals and the NaN policy
(`guards.py`), loggers (`loggers.py`). Process groups come from one `ProcessGroupCollection` built after
Megatron's parallel state; ranks are read from the groups.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.config import LongGenConfig, config_to_dict
from megatron_longgen.training.data_order import SampleOrder, micro_batches
from megatron_longgen.training.guards import NanGuard
from megatron_longgen.training.loggers import build_loggers, is_metrics_rank
from megatron_longgen.training.trainer_checkpoints import TrainerCheckpoints


@dataclass
class TrainResult:
    """What `fit` returns on every rank (losses only on the metrics rank, `is_metrics_rank`)."""

    losses: list[float]
    final_step: int
    checkpoint_dir: str | None
    wall_time_s: float
    start_step: int = 0
    stopped_by: str | None = None
    is_metrics_rank: bool = False
    notes: list[str] = field(default_factory=list)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def _forward_step(data_iterator, model, *, device, cp_shard):
    batch = cp_shard(next(data_iterator))
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    position_ids = batch["position_ids"].to(device)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, batch["loss_mask"].to(device))


class Trainer(TrainerCheckpoints):
    """Holds the model chunks, optimizer, scheduler and data for one run."""

    def __init__(
        self,
        cfg: LongGenConfig,
        *,
        run_dir: str | os.PathLike,
        quiet: bool = False,
        started_unix: float | None = None,
    ):
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_longgen.data.datasets import build_datasets
        from megatron_longgen.data.tokenizers import load_tokenizer
        from megatron_longgen.utils.distributed import init_distributed, initialize_model_parallel, set_seed

        self.started_unix = time.time() if started_unix is None else started_unix
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.rank, self.world_size = init_distributed()
        initialize_model_parallel(cfg)
        set_seed(cfg.train.seed)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.pgs = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_rank, self.pp_rank, self.cp_rank = self.pgs.tp.rank(), self.pgs.pp.rank(), self.pgs.cp.rank()
        self.pp_size, self.cp_size = self.pgs.pp.size(), self.pgs.cp.size()
        self.dp_rank, self.dp_size = self.pgs.dp.rank(), self.pgs.dp.size()
        t = cfg.train
        if t.global_batch_size % (t.micro_batch_size * self.dp_size):
            raise ValueError(
                f"global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size * dp = "
                f"{t.micro_batch_size} * {self.dp_size}"
            )
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.is_logging_rank = is_metrics_rank(
            pp_rank=self.pp_rank,
            pp_size=self.pp_size,
            tp_rank=self.tp_rank,
            dp_rank=self.dp_rank,
            cp_rank=self.cp_rank,
        )
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}"
            )
        self.train_data, self.valid_data = build_datasets(cfg, tokenizer=self.tokenizer)
        self.order = SampleOrder(len(self.train_data), seed=t.seed)
        self.nan_guard = NanGuard(policy=t.nan_policy, max_skips=t.max_nan_skips)
        self._build_model_and_optimizer()

    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_longgen.compat import mcore
        from megatron_longgen.megatron_bridge import TORCH_DTYPES, to_transformer_config
        from megatron_longgen.models.builder import build_model

        cfg, t = self.cfg, self.cfg.train
        self.tcfg = to_transformer_config(cfg)
        vpp = cfg.parallel.virtual_pipeline_parallel or 1
        chunks = []
        for vp_stage in range(vpp):
            pre = self.pp_rank == 0 and vp_stage == 0
            post = self.pp_rank == self.pp_size - 1 and vp_stage == vpp - 1
            chunk = build_model(
                cfg,
                transformer_config=self.tcfg,
                pre_process=pre,
                post_process=post,
                vp_stage=vp_stage if vpp > 1 else None,
            )
            chunks.append(chunk.to(self.device))
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_grad_reduce=False,
        )
        self.model = mcore.wrap_in_ddp(chunks, config=self.tcfg, ddp_config=ddp_cfg, pg_collection=self.pgs)
        dtype = TORCH_DTYPES[t.dtype]
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, self.model)
        self.scheduler = self._build_scheduler()
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tcfg.no_sync_func = (
            [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        )
        self.num_parameters = sum(p.numel() for m in self.model for p in m.parameters())

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.train
        decay_steps = max(t.max_steps - t.lr_warmup_steps, 1)
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if t.lr_warmup_steps else t.lr,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_steps,
            lr_decay_steps=t.lr_warmup_steps + decay_steps,
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.max_steps,
            wd_incr_style="constant",
        )

    # ---------------------------------------------------------------- data
    def _cp_shard(self, batch: dict) -> dict:
        if self.cp_size == 1:
            return batch
        from megatron_longgen.context_parallel.sharding import shard_batch_for_cp

        block = self.cfg.sparse.block_size if "S" in self.cfg.model.layer_pattern else 1
        return shard_batch_for_cp(batch, cp_rank=self.cp_rank, cp_size=self.cp_size, block_size=block)

    def _iterator(self, dataset, step: int):
        t = self.cfg.train
        order = self.order if dataset is self.train_data else SampleOrder(len(dataset), seed=t.seed)
        return micro_batches(
            dataset,
            order,
            step=step,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def _run(self, data_iter, *, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        vpp = len(self.model)
        if vpp > 1:
            # The interleaved schedule wants one iterator per model chunk; each chunk on the first/last stage
            # consumes micro-batches in the same order, so materialise the list once.
            batches = list(data_iter)
            data_iter = [iter(batches) for _ in range(vpp)]
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, device=self.device, cp_shard=self._cp_shard),
            data_iterator=data_iter,
            model=self.model if vpp > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            seq_length=t.seq_length,  # full length: the schedules divide by CP (and TP with SP) themselves
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_loss(self, losses_reduced: list) -> float:
        """Token-weighted mean loss of the global batch (meaningful on the last pipeline stage only)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for item in losses_reduced:
            total += item["lm loss"].to(total)
        if self.pp_rank == self.pp_size - 1:
            dist.all_reduce(total, group=self.pgs.dp_cp)
        return float(total[0] / total[1].clamp(min=1.0))

    # ---------------------------------------------------------------- steps
    def train_step(self, step: int) -> dict:
        """One optimizer step on global batch `step` (0-based). Non-finite gradients (NaN/Inf loss included:
        it makes them non-finite) go to the NaN guard before the optimizer touches the weights: `stop`
        raises, `skip` drops the update."""
        from megatron_longgen.training.optimizer_step import step_unless_nonfinite

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._reduce_loss(self._run(self._iterator(self.train_data, step), forward_only=False))
        outcome = step_unless_nonfinite(self.optimizer)
        if outcome.nonfinite:
            what = "loss" if self.is_logging_rank and math.isnan(loss) else "gradient norm"
            self.nan_guard.check(outcome.grad_norm, step=step + 1, what=what)
        if outcome.updated:
            self.scheduler.step(increment=1)
        return {
            "loss": loss,
            "grad_norm": outcome.grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "update_skipped": not outcome.updated,
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over `eval_iters` global batches of held-out data (always the same ones)."""
        if self.valid_data is None:
            return None
        for m in self.model:
            m.eval()
        losses = []
        for i in range(self.cfg.train.eval_iters):
            losses += self._run(self._iterator(self.valid_data, i), forward_only=True)
        for m in self.model:
            m.train()
        return self._reduce_loss(losses)

    def long_context_eval(self):
        """The run's passkey / NIAH eval (`eval.long_context_*`; samples built on first use)."""
        from megatron_longgen.training.long_context_eval import LongContextEval

        if getattr(self, "_long_context_eval", None) is None:
            self._long_context_eval = LongContextEval.from_config(self.cfg, self.tokenizer)
        return self._long_context_eval

    def _say(self, text: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(f"[longgen] {text}", flush=True)

    def _warn(self, text: str) -> None:
        """A warning the user must see (e.g. a damaged checkpoint skipped): stderr, also with --quiet."""
        if self.rank == 0:
            print(f"[longgen] warning: {text}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- loop
    def _peak_tflops(self) -> float | None:
        from megatron_longgen.training.flops import peak_tflops_for_device

        if self.cfg.logging.peak_tflops > 0:
            return self.cfg.logging.peak_tflops
        if self.device.type == "cuda":
            return peak_tflops_for_device(torch.cuda.get_device_name(self.device))
        return None

    def _peak_memory_gib(self) -> float:
        """Peak GPU memory allocated on this rank; on CPU the process's peak resident set size."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def fit(
        self,
        *,
        resume: bool = False,
        overwrite: bool = False,
        allow_changes: tuple[str, ...] = (),
        stop_after_steps: int | None = None,
    ) -> TrainResult:
        """Train until `train.max_steps` (or `stop_after_steps` more steps, or a preemption signal),
        checkpointing every `train.save_interval` steps and on exit. Collective on every rank.

        The run dir is claimed first (`run_dir.py`: refused when it holds another run unless `resume` or
        `overwrite`); if the run fails before its first step, a run dir it created is removed again."""
        from megatron_longgen.training import run_dir as rd
        from megatron_longgen.training.loop import run_loop

        state = rd.inspect(self.run_dir)  # read-only: every rank reaches the same verdict
        rd.check_claim(state, resume=resume, overwrite=overwrite)
        self._barrier()
        directory = rd.RunDirectory(self.run_dir)
        if self.rank == 0:
            directory.prepare(state, overwrite=overwrite)
            if directory.moved_aside:
                self._say(f"--overwrite: moved the previous run to {directory.moved_aside}")
        self._barrier()
        try:
            return run_loop(
                self,
                directory=directory,
                resume=resume,
                allow_changes=allow_changes,
                stop_after_steps=stop_after_steps,
            )
        except BaseException:
            if self.rank == 0 and not getattr(self, "_first_step_done", False):
                directory.abandon()
            raise

    def write_config(self) -> None:
        if self.rank == 0:
            tmp = self.run_dir / ".config.json.tmp"
            tmp.write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            os.replace(tmp, self.run_dir / "config.json")

    def loggers(self, *, resumed_at: int):
        return build_loggers(self, resumed_at=resumed_at)


def train(
    cfg: LongGenConfig,
    *,
    run_dir: str | os.PathLike,
    quiet: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    allow_changes: tuple[str, ...] = (),
    stop_after_steps: int | None = None,
    started_unix: float | None = None,
) -> TrainResult:
    """Build everything for `cfg` and train (see `Trainer.fit`)."""
    trainer = Trainer(cfg, run_dir=run_dir, quiet=quiet, started_unix=started_unix)
    return trainer.fit(
        resume=resume, overwrite=overwrite, allow_changes=allow_changes, stop_after_steps=stop_after_steps
    )
