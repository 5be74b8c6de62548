"""The step loop of `Trainer.fit`: restore, train, log, evaluate, checkpoint, stop on a signal.

Per logged step, metrics.jsonl / W&B / the console get: loss, LR, grad norm, step time and throughput
(tokens/s, per GPU, executed and dense-equivalent TFLOP/s and MFU) measured without evaluation and
checkpoint time, `eval_time_s` / `checkpoint_time_s` for that time, the run's tokens, its cumulative wall
clock and productive time across restarts (`clock.py`), peak memory and the NaN-skip count.
"""

from __future__ import annotations

import signal
import time

import torch

from megatron_longgen.training.clock import RunClock, StepTimer


def _banner(tr, *, start_step: int) -> str:
    cfg, t = tr.cfg, tr.cfg.train
    layout = "all full" if cfg.is_full_attention else cfg.sparse.variant
    return (
        f"{cfg.name}: pattern {cfg.model.layer_pattern} ({layout}), {tr.num_parameters / 1e6:.2f}M params/rank, "
        f"world {tr.world_size} (tp {cfg.parallel.tensor_parallel} pp {cfg.parallel.pipeline_parallel} "
        f"cp {cfg.parallel.context_parallel} dp {tr.dp_size}), device {tr.device.type}, "
        f"steps {start_step}->{t.max_steps}"
    )


def run_loop(tr, *, directory, resume: bool, allow_changes: tuple[str, ...], stop_after_steps: int | None):
    from megatron_longgen.attention.core_attention import attention_backend_summary
    from megatron_longgen.training.flops import throughput_metrics
    from megatron_longgen.training.guards import PreemptionFlag
    from megatron_longgen.training.trainer import TrainResult

    cfg, t = tr.cfg, tr.cfg.train
    start_step, state = tr.restore(resume=resume, allow_changes=allow_changes)
    clock = (
        RunClock.resume(state["clock"], started_unix=tr.started_unix)
        if state.get("clock")
        else RunClock.start(now_unix=tr.started_unix)
    )
    if resume and tr.is_logging_rank:
        dropped = directory.truncate_metrics(keep_through_step=start_step)
        if dropped:
            print(
                f"[longgen] metrics.jsonl: dropped {dropped} row(s) after step {start_step} "
                "(they are being redone)",
                flush=True,
            )
    tr.write_config()
    tr._say(_banner(tr, start_step=start_step))
    tr._say(attention_backend_summary(tr.model))
    if cfg.eval.long_context_interval:  # build the samples now: a bad setting fails before training
        e = cfg.eval
        tr._say(
            f"long-context eval every {e.long_context_interval} steps and at the end: "
            f"{len(tr.long_context_eval().samples)} samples ({', '.join(e.long_context_tasks)}; lengths "
            f"{list(e.long_context_lengths) or [t.seq_length]}; depths {list(e.long_context_depths)})"
        )
    logger = tr.loggers(resumed_at=start_step)
    peak = tr._peak_tflops()
    tokens_per_step = t.global_batch_size * t.seq_length
    end_step = t.max_steps if stop_after_steps is None else min(t.max_steps, start_step + stop_after_steps)
    sync = (lambda: torch.cuda.synchronize(tr.device)) if tr.device.type == "cuda" else None
    timer = StepTimer(sync=sync)
    preempt = PreemptionFlag()
    losses: list[float] = []
    saved_at, ckpt, stopped_by = None, None, None
    start = time.perf_counter()
    done = start_step
    saver = tr.saver()
    save_metrics: dict = {}
    failed = True
    try:
        for step in range(start_step, end_step):
            metrics = tr.train_step(step)
            tr._first_step_done = True
            timer.step_done()
            losses.append(metrics["loss"])
            done = step + 1
            with timer.excluded("checkpoint"):  # publishes a background save whose writers are done
                for published in saver.maybe_finalize():
                    ckpt = published.path
                    # The loop's own blocked time is `checkpoint_time_s` (timed here); add the save's total
                    # time (writers included) and size.
                    save_metrics.update(
                        {k: v for k, v in published.metrics().items() if k != "checkpoint_time_s"}
                    )
            evaluating = bool(t.eval_interval) and done % t.eval_interval == 0
            lc_interval = cfg.eval.long_context_interval
            retrieval = bool(lc_interval) and (done % lc_interval == 0 or done == end_step)
            # Every line carries the training metrics; evaluation steps are always logged.
            if done % t.log_interval == 0 or done == end_step or evaluating or retrieval:
                seconds, steps = timer.window()
                clock.add_productive(seconds)
                step_time = seconds / max(steps, 1)
                if evaluating:
                    with timer.excluded("eval"):
                        metrics["eval_loss"] = tr.evaluate()
                if retrieval:  # passkey / NIAH accuracy at long context (eval.long_context_*)
                    with timer.excluded("eval"):
                        metrics.update(tr.long_context_eval().run(tr) or {})
                excluded = timer.pop_excluded()
                metrics.update(
                    step_time_s=step_time,
                    tokens_per_s=tokens_per_step / step_time if step_time > 0 else float("nan"),
                    tokens_per_s_per_gpu=tokens_per_step / step_time / tr.world_size
                    if step_time > 0
                    else float("nan"),
                    eta_s=step_time * (t.max_steps - done),
                    tokens=done * tokens_per_step,
                    peak_mem_gib=tr._peak_memory_gib(),
                    nan_skips=tr.nan_guard.skipped,
                    **save_metrics,
                    eval_time_s=excluded.get("eval", 0.0),
                    checkpoint_time_s=excluded.get("checkpoint", 0.0),
                    **clock.metrics(),
                    **throughput_metrics(
                        cfg=cfg, step_time_s=step_time, num_gpus=tr.world_size, peak_tflops=peak
                    ),
                )
                save_metrics = {}
                logger.log(metrics, done)
            if preempt.should_stop(device=tr.device):
                stopped_by = (
                    f"preemption signal {signal.Signals(preempt.received).name}"
                    if preempt.received is not None
                    else "preemption signal on another rank"
                )
                break
            if t.save_interval and done % t.save_interval == 0:
                with timer.excluded("checkpoint"):
                    saved_at = done
                    result = tr.start_save(done, clock=clock)
                    if result.done:  # a synchronous save is published already: its size and total time now
                        ckpt = result.path
                        save_metrics.update(
                            {k: v for k, v in result.metrics().items() if k != "checkpoint_time_s"}
                        )
        if (t.save_on_exit or stopped_by) and saved_at != done and done > start_step:
            seconds, _ = timer.window()
            clock.add_productive(seconds)
            saved_at = done
            result = tr.start_save(done, clock=clock)
            ckpt = result.path if result.done else ckpt
        for published in saver.finalize_all():  # the exit save, and a periodic one still being written
            ckpt = published.path
        failed = False
    finally:
        preempt.restore()
        logger.close()
        if not failed:
            saver.close()
    if stopped_by:
        tr._say(f"{stopped_by}: saved {ckpt} at step {done}; exiting")
    return TrainResult(
        losses=losses if tr.is_logging_rank else [],
        final_step=done,
        checkpoint_dir=str(ckpt) if ckpt else None,
        wall_time_s=time.perf_counter() - start,
        start_step=start_step,
        stopped_by=stopped_by,
        is_metrics_rank=tr.is_logging_rank,
    )
