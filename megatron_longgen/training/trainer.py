"""The training loop: Megatron-Core DDP + (distributed) optimizer + pipeline schedules, our data and logs.

One step = one global batch = `global_batch_size / (micro_batch_size * dp)` micro-batches per data-parallel
rank, run by Megatron's `get_forward_backward_func()` (no pipelining, 1F1B, or interleaved), then
`optimizer.step()` (grad clipping inside) and the LR scheduler.

Losses are per-token (`calculate_per_token_loss`): each micro-batch returns (sum of token losses, token
count) and Megatron divides the gradients by the global token count, so the result does not depend on how
the batch is split over DP, CP or micro-batches.

Data order is a pure function of (seed, step): global sample `step * global_batch_size + i` of a seeded
per-epoch permutation, rank `dp` taking its contiguous share. That makes any step reproducible without
iterator state, so resuming needs only the step number (plus model, optimizer, scheduler and RNG state:
`training/checkpointing.py`); the loss sequence after `--resume` equals an uninterrupted run's.

Exits: SIGTERM/SIGUSR1 set a flag (`training/guards.py`); all ranks agree at the end of the step, save
and return normally. A non-finite loss stops the run with the step number, or is skipped and counted
(`train.nan_policy`). Metrics per logged step: loss, LR, grad norm, tokens/s (total and per GPU), step
time, wall clock, peak memory, executed and dense-equivalent TFLOP/s per GPU and MFU (`training/flops.py`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.config import LongGenConfig, config_to_dict
from megatron_longgen.training.guards import NanGuard
from megatron_longgen.training.loggers import (
    ConsoleLogger,
    JsonlLogger,
    LoggerGroup,
    MetricsLogger,
    WandbLogger,
    is_metrics_rank,
)


@dataclass
class TrainResult:
    """What `train` returns on every rank (losses only on the metrics rank)."""

    losses: list[float]
    final_step: int
    checkpoint_dir: str | None
    wall_time_s: float


class SampleOrder:
    """Deterministic global sample order: a fresh seeded permutation of the dataset per epoch."""

    def __init__(self, num_samples: int, *, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.num_samples)
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._cache[epoch][offset])


def micro_batches(dataset, order: SampleOrder, *, step: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int):
    """Yield this DP rank's micro-batches (dicts of [mbs, s] tensors) for optimizer step `step`."""
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    for start in range(first, first + per_rank, micro_batch_size):
        samples = [dataset[order(i)] for i in range(start, start + micro_batch_size)]
        yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def _forward_step(data_iterator, model, *, device, cp_shard):
    batch = next(data_iterator)
    batch = cp_shard(batch)
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    position_ids = batch["position_ids"].to(device)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, batch["loss_mask"].to(device))


class Trainer:
    """Holds the model chunks, optimizer, scheduler and data for one run."""

    def __init__(self, cfg: LongGenConfig, *, run_dir: str | os.PathLike, quiet: bool = False):
        from megatron.core import parallel_state as ps

        from megatron_longgen.data.datasets import build_datasets
        from megatron_longgen.data.tokenizers import load_tokenizer
        from megatron_longgen.utils.distributed import init_distributed, initialize_model_parallel, set_seed

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.rank, self.world_size = init_distributed()
        initialize_model_parallel(cfg)
        set_seed(cfg.train.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.cp_size = ps.get_context_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        t = cfg.train
        if t.global_batch_size % (t.micro_batch_size * self.dp_size):
            raise ValueError(
                f"global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size * dp = "
                f"{t.micro_batch_size} * {self.dp_size}"
            )
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.is_logging_rank = is_metrics_rank(
            pp_rank=self.pp_rank, pp_size=self.pp_size, tp_rank=self.tp_rank, dp_rank=self.dp_rank, cp_rank=self.cp_rank
        )
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}"
            )
        self.train_data, self.valid_data = build_datasets(cfg, tokenizer=self.tokenizer)
        self.order = SampleOrder(len(self.train_data), seed=cfg.train.seed)
        self.nan_guard = NanGuard(policy=cfg.train.nan_policy, max_skips=cfg.train.max_nan_skips)
        self._build_model_and_optimizer()

    def _build_model_and_optimizer(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_longgen.megatron_bridge import TORCH_DTYPES, to_transformer_config
        from megatron_longgen.models.builder import build_model

        cfg, t = self.cfg, self.cfg.train
        self.tcfg = to_transformer_config(cfg)
        vpp = cfg.parallel.virtual_pipeline_parallel or 1
        chunks = []
        for vp_stage in range(vpp):
            pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            chunk = build_model(cfg, transformer_config=self.tcfg, pre_process=pre, post_process=post,
                                vp_stage=vp_stage if vpp > 1 else None)
            chunks.append(chunk.to(self.device))
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_grad_reduce=False,
        )
        self.model = [
            DistributedDataParallel(config=self.tcfg, ddp_config=ddp_cfg, module=chunk,
                                    disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
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
        decay_steps = max(t.max_steps - t.lr_warmup_steps, 1)
        self.scheduler = OptimizerParamScheduler(
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
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tcfg.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.num_parameters = sum(p.numel() for m in self.model for p in m.parameters())

    # ---------------------------------------------------------------- data
    def _cp_shard(self, batch: dict) -> dict:
        if self.cp_size == 1:
            return batch
        from megatron_longgen.context_parallel.sharding import shard_batch_for_cp

        block = self.cfg.sparse.block_size if "S" in self.cfg.model.layer_pattern else 1
        return shard_batch_for_cp(batch, cp_rank=self.cp_rank, cp_size=self.cp_size, block_size=block)

    def _iterator(self, dataset, step: int):
        t = self.cfg.train
        return micro_batches(dataset, self.order if dataset is self.train_data else SampleOrder(len(dataset), seed=t.seed),
                             step=step, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                             dp_rank=self.dp_rank, dp_size=self.dp_size)

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
        """Token-weighted mean loss of the global batch (valid on the last pipeline stage)."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for item in losses_reduced:
            total += item["lm loss"].to(total)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        return float(total[0] / total[1].clamp(min=1.0))

    # ---------------------------------------------------------------- steps
    def _global_flag(self, bad: bool) -> bool:
        """MAX over all ranks (the loss lives on the last pipeline stage only)."""
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _grads_finite(self) -> bool:
        """Whether this rank's gradient buffers (after Megatron's DP reduction) hold only finite values.
        bf16 training has no loss scaler to catch overflows, so this is what protects the weights."""
        for chunk in self.model:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                if not torch.isfinite(buffer.grad_data).all():
                    return False
        return True

    def train_step(self, step: int) -> dict:
        """One optimizer step on global batch `step` (0-based). A non-finite loss or gradient goes to the
        NaN guard before the optimizer touches the weights: `stop` raises, `skip` drops the update."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(self._iterator(self.train_data, step), forward_only=False)
        loss = self._reduce_loss(losses)
        lr = self.optimizer.param_groups[0]["lr"]
        if self._global_flag(not math.isfinite(loss)):
            self.nan_guard.check(float("nan") if math.isfinite(loss) else loss, step=step + 1)
            return {"loss": loss, "grad_norm": float("nan"), "lr": lr, "update_skipped": True}
        if self._global_flag(not self._grads_finite()):
            self.nan_guard.check(float("nan"), step=step + 1, what="gradient")
            return {"loss": loss, "grad_norm": float("nan"), "lr": lr, "update_skipped": True}
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if ok:
            self.scheduler.step(increment=1)
        return {"loss": loss, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
                "update_skipped": not ok}

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

    def _loggers(self, *, append: bool) -> MetricsLogger:
        if not self.is_logging_rank:
            return MetricsLogger()
        loggers: list[MetricsLogger] = [JsonlLogger(self.run_dir / "metrics.jsonl", append=append)]
        if not self.quiet:
            loggers.append(ConsoleLogger(max_steps=self.cfg.train.max_steps))
        if self.cfg.logging.wandb:
            loggers.append(WandbLogger(project=self.cfg.logging.wandb_project,
                                       name=self.cfg.logging.run_name or self.cfg.name,
                                       config=config_to_dict(self.cfg), run_dir=self.run_dir,
                                       mode=self.cfg.logging.wandb_mode, resume_run=append))
        return LoggerGroup(loggers)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, step: int) -> Path:
        """Collective: publish a resumable checkpoint after `step` completed steps."""
        from megatron_longgen.training.checkpointing import save_training_checkpoint

        return save_training_checkpoint(
            checkpoints_dir=self.checkpoints_dir, step=step, cfg=self.cfg, model_chunks=self.model,
            optimizer=self.optimizer, scheduler=self.scheduler,
            extra_state={"nan_skips": self.nan_guard.skipped},
            keep_last=self.cfg.train.keep_last_checkpoints,
        )

    def restore(self, *, resume: bool) -> int:
        """Collective: the step to start from. With `resume`, the latest complete checkpoint of this run
        (model, optimizer, scheduler, RNG, NaN counter; data order follows from the step); otherwise, or
        when there is none, `train.init_checkpoint`'s weights when set; else step 0 from scratch."""
        from megatron_longgen.training.checkpointing import (
            latest_checkpoint,
            load_model_weights,
            load_training_checkpoint,
        )

        latest = latest_checkpoint(self.checkpoints_dir) if resume else None
        if latest is not None:
            state = load_training_checkpoint(latest, model_chunks=self.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler)
            self.nan_guard.skipped = int(state.get("nan_skips", 0))
            self._say(f"resumed from {latest} at step {state['step']}")
            return int(state["step"])
        init = self.cfg.train.init_checkpoint
        if init:
            src = load_model_weights(init, model_chunks=self.model)
            if src.model.num_layers != self.cfg.model.num_layers or src.model.hidden_size != self.cfg.model.hidden_size:
                raise ValueError(
                    f"init_checkpoint {init} has {src.model.num_layers} layers of width {src.model.hidden_size}; "
                    f"the run has {self.cfg.model.num_layers} of width {self.cfg.model.hidden_size}"
                )
            # The optimizer's fp32 main params were copied from the random init; refresh them.
            self.optimizer.reload_model_params()
            self._say(f"initialised weights from {init}")
        elif resume:
            self._say(f"--resume: no checkpoint in {self.checkpoints_dir}; starting from scratch")
        return 0

    def _say(self, text: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(f"[longgen] {text}", flush=True)

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

    def fit(self, *, resume: bool = False, stop_after_steps: int | None = None) -> TrainResult:
        """Train until `train.max_steps` (or `stop_after_steps` more steps, or a preemption signal),
        checkpointing every `train.save_interval` steps and on exit. Collective on every rank."""
        from megatron_longgen.training.flops import throughput_metrics
        from megatron_longgen.training.guards import PreemptionFlag

        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start_step = self.restore(resume=resume)
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            layout = "all full" if cfg.is_full_attention else cfg.sparse.variant
            self._say(f"{cfg.name}: pattern {cfg.model.layer_pattern} ({layout}), "
                      f"{self.num_parameters / 1e6:.2f}M params/rank, world {self.world_size} "
                      f"(tp {cfg.parallel.tensor_parallel} pp {cfg.parallel.pipeline_parallel} "
                      f"cp {cfg.parallel.context_parallel} dp {self.dp_size}), device {self.device.type}, "
                      f"steps {start_step}->{t.max_steps}")
        logger = self._loggers(append=start_step > 0)
        peak = self._peak_tflops()
        tokens_per_step = t.global_batch_size * t.seq_length
        end_step = t.max_steps if stop_after_steps is None else min(t.max_steps, start_step + stop_after_steps)
        preempt = PreemptionFlag()
        losses: list[float] = []
        saved_at, ckpt, stopped_by = None, None, None
        start = time.perf_counter()
        window_start, window_steps = start, 0
        done = start_step
        try:
            for step in range(start_step, end_step):
                metrics = self.train_step(step)
                losses.append(metrics["loss"])
                window_steps += 1
                done = step + 1
                evaluating = bool(t.eval_interval) and done % t.eval_interval == 0
                # Every line carries the training metrics; evaluation steps are always logged.
                if done % t.log_interval == 0 or done == end_step or evaluating:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    step_time = (now - window_start) / window_steps
                    metrics.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                                   tokens_per_s_per_gpu=tokens_per_step / step_time / self.world_size,
                                   wall_time_s=now - start, eta_s=step_time * (t.max_steps - done),
                                   tokens=done * tokens_per_step, peak_mem_gib=self._peak_memory_gib(),
                                   nan_skips=self.nan_guard.skipped,
                                   **throughput_metrics(cfg=cfg, step_time_s=step_time,
                                                        num_gpus=self.world_size, peak_tflops=peak))
                    window_start, window_steps = now, 0
                    if evaluating:
                        metrics["eval_loss"] = self.evaluate()
                    logger.log(metrics, done)
                if preempt.should_stop(device=self.device):
                    stopped_by = "signal"
                    break
                if t.save_interval and done % t.save_interval == 0:
                    ckpt, saved_at = self.save(done), done
            if (t.save_on_exit or stopped_by) and saved_at != done and done > start_step:
                ckpt, saved_at = self.save(done), done
        finally:
            preempt.restore()
            logger.close()
        if stopped_by:
            self._say(f"preemption signal: saved {ckpt} at step {done}; exiting")
        return TrainResult(losses=losses, final_step=done, checkpoint_dir=str(ckpt) if ckpt else None,
                           wall_time_s=time.perf_counter() - start)


def train(cfg: LongGenConfig, *, run_dir: str | os.PathLike, quiet: bool = False, resume: bool = False,
          stop_after_steps: int | None = None) -> TrainResult:
    """Build everything for `cfg` and train (see `Trainer.fit`)."""
    return Trainer(cfg, run_dir=run_dir, quiet=quiet).fit(resume=resume, stop_after_steps=stop_after_steps)
