"""Saving training checkpoints: `CheckpointSaver` (background or synchronous) and its publish step.

Per save, on every rank of the default group (Megatron-Core's dist_checkpointing saves over it):
1. `save()`: a collective pre-flight (rank 0 creates `.tmp_step_N`, removes stale temp folders and checks
   the free space against the checkpoint's size estimated from the state dicts; every rank gets the
   same verdict), the small files (RNG per rank; config and trainer state from rank 0), then
   Megatron-Core's planning and writers (`_run_megatron_save`): forked in the background
   (`async_save=True`, Megatron's `AsyncCallsQueue`; on GPU the tensors are first copied to host
   memory, on CPU the fork's copy-on-write memory is the snapshot) or run before `save()` returns.
2. Finalize, once the writers are done on every rank (at once when synchronous; else in `maybe_finalize()`
   / `finalize_all()`): Megatron's metadata, the manifest (each rank hashes its own files), then rank 0
   renames the folder to `step_N`, rewrites `latest` and deletes the oldest checkpoints beyond K.
A process killed at any point leaves the previous `latest` and every `step_N` intact; at most one save is
in flight (`save()` first finalizes the previous one). Full disks and unwritable folders become one
`CheckpointSaveError` on every rank (`save_errors.py`), with the partial folder removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.checkpoint.format import model_dir, save_config
from megatron_longgen.config import LongGenConfig
from megatron_longgen.training.checkpointing.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    OPTIM_SUBDIR,
    RNG_SUBDIR,
    TMP_PREFIX,
    TRAINER_STATE_FILE,
    checkpoint_name,
    complete_checkpoints,
    latest_checkpoint,
    rng_file,
    temp_dir,
    write_text_atomic,
)
from megatron_longgen.training.checkpointing.manifest import all_gather, write_manifest
from megatron_longgen.training.checkpointing.megatron_async import (
    async_save_supported,
    combine_requests,
    drain_write_results,
)
from megatron_longgen.training.checkpointing.save_errors import (
    CheckpointSaveError,
    checkpoint_size_estimate,
    classify_save_error,
    free_bytes,
    local_checkpoint_bytes,
    space_message,
)
from megatron_longgen.training.checkpointing.state import (
    model_sharded_state_dict,
    optimizer_metadata,
    rng_state,
)
from megatron_longgen.training.guards import shield_helper_processes


@dataclasses.dataclass
class SaveResult:
    """One checkpoint save. Times in seconds, all of them time the training loop did not train:
    `blocking_s` is what `save()` cost the caller (for a synchronous save, everything); `finalize_s` what
    the `maybe_finalize()` / `finalize_all()` call that published it cost (manifest, rename; with
    `finalize_all()` also the wait for the writers; 0 until done); `total_s` runs from the start of
    `save()` to publication (the writers' time included). `metrics()` flattens them for a logger."""

    step: int
    path: Path
    asynchronous: bool
    blocking_s: float = 0.0
    finalize_s: float = 0.0
    total_s: float | None = None
    num_bytes: int | None = None
    done: bool = False
    _start: float = dataclasses.field(default=0.0, repr=False)
    _need: int = dataclasses.field(default=0, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a metrics logger."""
        out = {"checkpoint_time_s": self.blocking_s + self.finalize_s}
        if self.total_s is not None:
            out["checkpoint_total_s"] = self.total_s
        if self.num_bytes is not None:
            out["checkpoint_gib"] = self.num_bytes / 2**30
        return out


class CheckpointSaver:
    """Saves resumable training checkpoints into `checkpoints_dir`, in the background when `async_save`
    (default: `async_save_supported()`), each published atomically with a manifest.

    Every method is collective (all ranks of the default group call it in the same order, as
    Megatron-Core's dist_checkpointing saves over the default group). Use:

        saver = CheckpointSaver(run_dir / "checkpoints", keep_last=3)
        for step in ...:
            ...train step...
            for done in saver.maybe_finalize():          # cheap when nothing is in flight
                log(done.metrics(), step)
            if step % interval == 0:
                log(saver.save(step=step, cfg=cfg, model_chunks=model, optimizer=opt,
                               scheduler=sched).metrics(), step)
        saver.finalize_all()                             # at exit and on preemption, before exiting
    """

    def __init__(
        self, checkpoints_dir: str | os.PathLike, *, async_save: bool | None = None, keep_last: int = 0
    ):
        self.root = Path(checkpoints_dir)
        self.async_save = async_save_supported() if async_save is None else async_save
        self.keep_last = keep_last
        self._queue = None
        self._in_flight: SaveResult | None = None

    @property
    def in_flight(self) -> SaveResult | None:
        return self._in_flight

    def save(
        self,
        *,
        step: int,
        cfg: LongGenConfig,
        model_chunks,
        optimizer=None,
        scheduler=None,
        extra_state: dict | None = None,
    ) -> SaveResult:
        """Start (or, synchronously, do) the save of everything needed to resume after `step` steps.

        Returns the SaveResult (done already for a synchronous save). `extra_state` (JSON-serialisable)
        lands in trainer_state.json. Raises CheckpointSaveError for a full disk or an unwritable folder
        (on every rank; the previous checkpoints untouched, the partial folder removed).
        """
        self.finalize_all()
        start = time.perf_counter()
        result = SaveResult(step=step, path=self.root / checkpoint_name(step), asynchronous=self.async_save)
        tmp = temp_dir(self.root, step)
        model_sd = model_sharded_state_dict(model_chunks)
        optim_sd = None
        if optimizer is not None:
            metadata = optimizer_metadata(cfg.train.optimizer_checkpoint_format)
            optim_sd = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), metadata=metadata)
        need = checkpoint_size_estimate(
            _sum_over_ranks(local_checkpoint_bytes(model_sd, optim_sd)), world_size=dist.get_world_size()
        )
        result._start, result._need = start, need
        self._prepare(tmp, step=step, need=need, with_optim=optim_sd is not None)
        try:
            self._write_small_files(tmp, step=step, cfg=cfg, scheduler=scheduler, extra_state=extra_state)
            self._run_megatron_save(model_sd, optim_sd, tmp, finalize=partial(self._publish, result, tmp))
        except BaseException as err:
            known = self._clean_up_failed(err, tmp, step=step, need=need)
            if known is None:
                raise
            raise known from err
        if self.async_save:
            self._in_flight = result
        result.blocking_s = time.perf_counter() - start
        if result.done:  # synchronous: published before returning
            result.total_s = result.blocking_s
        return result

    def maybe_finalize(self) -> list[SaveResult]:
        """Collective, non-blocking: publish the in-flight save if its writers are done on every rank.
        Returns the saves published by this call. Raises CheckpointSaveError if the writers failed."""
        return self._finalize(blocking=False)

    def finalize_all(self) -> list[SaveResult]:
        """Collective, blocking: wait for the in-flight save (if any) and publish it."""
        return self._finalize(blocking=True)

    def close(self) -> None:
        """finalize_all(), then stop Megatron's async machinery."""
        self.finalize_all()
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    # ------------------------------------------------------------------------------------- internals

    def _finalize(self, *, blocking: bool) -> list[SaveResult]:
        pending = self._in_flight
        if pending is None or self._queue is None:
            return []
        start = time.perf_counter()
        try:
            finished = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as err:
            self._in_flight = None
            known = self._clean_up_failed(
                err, temp_dir(self.root, pending.step), step=pending.step, need=pending._need
            )
            if known is None:
                raise
            raise known from err
        if not finished:
            return []
        self._in_flight = None
        pending.finalize_s = time.perf_counter() - start
        return [pending]

    def _prepare(self, tmp: Path, *, step: int, need: int, with_optim: bool) -> None:
        """Collective pre-flight: rank 0 makes a fresh temp folder and checks the free space; every rank
        raises the same CheckpointSaveError if either fails, before any rank starts writing."""
        message = None
        if dist.get_rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(f"{TMP_PREFIX}step_*"):  # left by a killed save
                    shutil.rmtree(stale, ignore_errors=True)
                model_dir(tmp).mkdir(parents=True)
                (tmp / RNG_SUBDIR).mkdir()
                if with_optim:
                    (tmp / OPTIM_SUBDIR).mkdir()
                free = free_bytes(tmp)
                if free is not None and free < need:
                    shutil.rmtree(tmp, ignore_errors=True)
                    message = (
                        space_message(
                            name=checkpoint_name(step),
                            root=self.root,
                            need=need,
                            free=free,
                            previous=latest_checkpoint(self.root),
                        ),
                        None,
                    )
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                known = classify_save_error(
                    err,
                    name=checkpoint_name(step),
                    root=self.root,
                    need=need,
                    previous=latest_checkpoint(self.root),
                )
                message = (str(known) if known else f"cannot create {tmp}: {err}", err.errno)
        verdict = all_gather(message, dist.group.WORLD)[0]
        if verdict is not None:
            raise CheckpointSaveError(verdict[0], code=verdict[1], path=self.root)

    def _write_small_files(self, tmp: Path, *, step: int, cfg, scheduler, extra_state) -> None:
        """RNG (every rank), config and trainer state (rank 0); errors are agreed on before Megatron's
        collectives start, so no rank is left waiting."""
        error = None
        try:
            torch.save(rng_state(), rng_file(tmp, dist.get_rank()))
            if dist.get_rank() == 0:
                save_config(cfg, tmp)
                state = {
                    "step": step,
                    "world_size": dist.get_world_size(),
                    "parallel": {
                        "tensor_parallel": cfg.parallel.tensor_parallel,
                        "pipeline_parallel": cfg.parallel.pipeline_parallel,
                        "context_parallel": cfg.parallel.context_parallel,
                    },
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "optimizer_checkpoint_format": cfg.train.optimizer_checkpoint_format,
                    "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
                    "manifest": MANIFEST_FILE,
                    **(extra_state or {}),
                }
                write_text_atomic(
                    tmp / TRAINER_STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n"
                )
        except Exception as err:
            # in a collective that another rank skipped)
            if isinstance(err, OSError) and err.errno is not None:
                error = (err.errno, err.filename, err.strerror)
            else:
                error = (None, None, f"{type(err).__name__}: {err}")
        first = next((e for e in all_gather(error, dist.group.WORLD) if e is not None), None)
        if first is not None:
            code, filename, text = first
            raise OSError(code, text, filename) if code is not None else RuntimeError(text)

    def _run_megatron_save(self, model_sd: dict, optim_sd: dict | None, tmp: Path, *, finalize) -> None:
        """Megatron-Core's part of a save: planning + common files, then its writer processes, forked in
        the background or run now; `finalize` runs after Megatron's own finalizers.

        Every process the save starts is started here: the results-queue manager (spawned on the first
        save, by planning) and the writers (forked). A signal shield for them wraps this body.
        """
        from megatron.core import dist_checkpointing

        from megatron_longgen.compat.mcore import async_save_kwargs

        kwargs = {"async_sharded_save": True, **async_save_kwargs()}
        # Slurm signals every process of a job step: the shield keeps the writers alive through the
        # preemption signal that asked for this save, and kills them if the trainer dies.
        with shield_helper_processes():
            requests = [dist_checkpointing.save(model_sd, str(model_dir(tmp)), **kwargs)]
            if optim_sd is not None:
                requests.append(dist_checkpointing.save(optim_sd, str(tmp / OPTIM_SUBDIR), **kwargs))
            request = combine_requests(requests, finalize=finalize)
            if not self.async_save:
                request.execute_sync()
                return
            if self._queue is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                # Temporal (fork per save), not persistent (spawned worker fed through a queue): the fork's
                # copy-on-write memory is a consistent snapshot even for CPU tensors that training updates.
                self._queue = AsyncCallsQueue(persistent=False)
            self._queue.schedule_async_request(request)

    def _publish(self, result: SaveResult, tmp: Path) -> None:
        """Finalize step, on every rank after Megatron's own finalizers: manifest, rename, `latest`,
        rotation. Raises on every rank if rank 0 could not publish."""
        result.num_bytes = write_manifest(tmp, group=dist.group.WORLD)
        error = None
        if dist.get_rank() == 0:
            try:
                if result.path.exists():  # re-saving the same step (e.g. exit right after a periodic save)
                    shutil.rmtree(result.path)
                os.replace(tmp, result.path)
                write_text_atomic(self.root / LATEST_FILE, result.path.name + "\n")
            except OSError as err:
                error = err
            if error is None and self.keep_last > 0:
                for old in complete_checkpoints(self.root)[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        error = all_gather(error, dist.group.WORLD)[0]
        if error is not None:
            raise error
        result.done = True
        result.total_s = time.perf_counter() - result._start

    def _clean_up_failed(self, err: BaseException, tmp: Path, *, step: int, need: int):
        """Remove the partial folder (rank 0); return the CheckpointSaveError to raise for a full disk or
        an unwritable folder, or None for anything else (a bug: the caller re-raises it)."""
        from torch.distributed.checkpoint.api import CheckpointException

        known = (
            err
            if isinstance(err, CheckpointSaveError)
            else classify_save_error(
                err,
                name=checkpoint_name(step),
                root=self.root,
                need=need,
                previous=latest_checkpoint(self.root),
            )
        )
        if isinstance(err, CheckpointException):
            # Raised on every rank (dist checkpointing broadcasts write failures), with the details on the
            # coordinator only: agree on its explanation. Not for other exceptions, which may have been
            # raised on one rank while the others wait in a collective.
            verdicts = all_gather(None if known is None else (known.message, known.errno), dist.group.WORLD)
            first = next((v for v in verdicts if v is not None), None)
            known = None if first is None else CheckpointSaveError(first[0], code=first[1], path=self.root)
        drain_write_results()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return known


def _sum_over_ranks(value: int) -> int:
    return sum(all_gather(int(value), dist.group.WORLD))


def save_training_checkpoint(
    *,
    checkpoints_dir: str | os.PathLike,
    step: int,
    cfg: LongGenConfig,
    model_chunks,
    optimizer=None,
    scheduler=None,
    extra_state: dict | None = None,
    keep_last: int = 0,
) -> Path:
    """Collective, synchronous: save and publish everything needed to resume after `step` steps; returns
    the published folder `checkpoints_dir/step_N`. (`CheckpointSaver` for background saves and timings.)"""
    saver = CheckpointSaver(checkpoints_dir, async_save=False, keep_last=keep_last)
    result = saver.save(
        step=step,
        cfg=cfg,
        model_chunks=model_chunks,
        optimizer=optimizer,
        scheduler=scheduler,
        extra_state=extra_state,
    )
    return result.path
