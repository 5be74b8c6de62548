"""Training checkpoints: Megatron-Core distributed checkpoints, saved in the background or not, each
published atomically with a manifest, the last K kept.

Layout (the model part is `checkpoint/format.py`'s, shared with the HF converter, so a training
checkpoint is also a valid converter/inference checkpoint; folder naming in `checkpoint_layout.py`):

    RUN_DIR/checkpoints/
      latest                  text: the name of the newest published checkpoint ("step_0000100")
      step_0000100/
        longgen_config.json   {"format_version": 1, "config": ...}     (checkpoint.format.save_config)
        model/                dist checkpoint of model.sharded_state_dict()   (global tensors: any TP/PP)
        optim/                dist checkpoint of optimizer.sharded_state_dict(model_sd)
        rng/rank_00000.pt     per-rank RNG states (python, numpy, torch, CUDA, Megatron's tracker)
        trainer_state.json    step, LR-scheduler state, NaN-skip counter, world layout
        manifest.json         every file above with size and checksum (`manifest.py`), written last
      .tmp_step_0000200/      a save in progress (ignored by readers; removed by the next save)

Saving (`CheckpointSaver`), on every rank:
1. `save()`: a collective pre-flight (rank 0 creates `.tmp_step_N`, removes stale temp folders and checks
   the free space against the checkpoint's size estimated from the state dicts; every rank gets the
   same verdict), then the small files (RNG, config, trainer state) and Megatron-Core's planning; the
   tensor bytes are written by Megatron's writer processes: forked in the background
   (`async_save=True`, Megatron's `AsyncCallsQueue`; on GPU the tensors are first copied to host
   memory, on CPU the fork's copy-on-write snapshot keeps the saved values) or before `save()` returns.
2. Finalize, when the writers are done (at once for a synchronous save; in `maybe_finalize()` /
   `finalize_all()` otherwise): Megatron's metadata, then the manifest (each rank hashes its files),
   then rank 0 renames the folder to `step_N` (an atomic `os.replace` on one file system), rewrites
   `latest` through a temporary file + `os.replace`, and deletes the oldest published checkpoints beyond K.
A process killed at any point leaves the previous `latest` and `step_N` folders intact; at most one save
is in flight (a new `save()` first finalizes the previous one).

Loading: `manifest.select_resume_checkpoint` picks the newest intact checkpoint; `load_training_checkpoint`
restores it and names the file when something in it still cannot be read.

Data-iterator state is the step number alone: the trainer's sample order is a pure function of
(seed, step) (`trainer.SampleOrder`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.checkpoint.format import load_config, model_dir, save_config
from megatron_longgen.config import LongGenConfig
from megatron_longgen.training.checkpoint_layout import (  # noqa: F401  (re-exported: the public names)
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
from megatron_longgen.training.manifest import (  # noqa: F401  (re-exported)
    CorruptCheckpointError,
    NoIntactCheckpointError,
    all_gather,
    find_resumable_checkpoint,
    manifest_total_bytes,
    select_resume_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from megatron_longgen.training.save_errors import (
    CheckpointSaveError,
    classify_save_error,
    local_checkpoint_bytes,
    space_message,
)


def _unwrap(model_chunks) -> list:
    return [getattr(m, "module", m) for m in model_chunks]


def model_sharded_state_dict(model_chunks) -> dict:
    """One sharded state dict for all model chunks (virtual pipeline chunks nest under `vpN`; the
    ShardedTensor keys are global, so the files do not depend on the layout)."""
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(model_chunks, state: dict) -> None:
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"vp{i}"])


def _rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _optimizer_metadata(fmt: str) -> dict:
    """Megatron-Core's sharding choice for DistributedOptimizer state (other optimizers ignore it). Its
    default in 0.16.1, `fully_sharded_model_space`, fails to save at DP > 1 ("ShardedTensor.flattened_range
    is not supported"), so the format is always named explicitly."""
    return {"distrib_optim_sharding_type": fmt}


# ------------------------------------------------------------------------------------------ saving


def async_save_supported() -> bool:
    """Whether `CheckpointSaver` defaults to background saves: Megatron-Core's AsyncCallsQueue forks the
    writer after a device->host copy and checks completion with an all-reduce. That works on CUDA and, in
    a process with the CPU compatibility layer (`utils.cpu_compat`, on in every CPU process that
    `init_distributed` started), on CPU/gloo too: the fork's copy-on-write memory is the snapshot."""
    if torch.cuda.is_available():
        return True
    from megatron_longgen.utils.cpu_compat import is_cpu_compat_enabled

    return is_cpu_compat_enabled()


@dataclasses.dataclass
class SaveResult:
    """One checkpoint save. Times in seconds: `blocking_s` is what `save()` cost the caller (the number to
    log as checkpoint time and to keep out of throughput), `finalize_s` what finalizing cost it later
    (manifest, rename; 0 until done), `total_s` from the start of `save()` to publication."""

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

    def __init__(self, checkpoints_dir: str | os.PathLike, *, async_save: bool | None = None, keep_last: int = 0):
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
        from megatron.core import dist_checkpointing

        self.finalize_all()
        start = time.perf_counter()
        result = SaveResult(step=step, path=self.root / checkpoint_name(step), asynchronous=self.async_save)
        tmp = temp_dir(self.root, step)
        model_sd = model_sharded_state_dict(model_chunks)
        optim_sd = None
        if optimizer is not None:
            optim_sd = optimizer.sharded_state_dict(
                model_sharded_state_dict(model_chunks), metadata=_optimizer_metadata(cfg.train.optimizer_checkpoint_format)
            )
        need = _sum_over_ranks(local_checkpoint_bytes(model_sd, optim_sd))
        result._start, result._need = start, need
        self._prepare(tmp, step=step, need=need, with_optim=optim_sd is not None)
        try:
            self._write_small_files(tmp, step=step, cfg=cfg, scheduler=scheduler, extra_state=extra_state)
            requests = [dist_checkpointing.save(model_sd, str(model_dir(tmp)), async_sharded_save=True)]
            if optim_sd is not None:
                requests.append(dist_checkpointing.save(optim_sd, str(tmp / OPTIM_SUBDIR), async_sharded_save=True))
            request = _combine_requests(requests, finalize=partial(self._publish, result, tmp))
            self._start_writers(request)
        except BaseException as err:
            known = self._clean_up_failed(err, tmp, step=step, need=need)
            if known is None:
                raise
            raise known from err
        if self.async_save:
            self._in_flight = result
        result.blocking_s = time.perf_counter() - start
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
            known = self._clean_up_failed(err, temp_dir(self.root, pending.step), step=pending.step,
                                          need=pending._need)
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
                (tmp / "model").mkdir(parents=True)
                (tmp / "rng").mkdir()
                if with_optim:
                    (tmp / OPTIM_SUBDIR).mkdir()
                free = shutil.disk_usage(tmp).free
                if free < need:
                    shutil.rmtree(tmp, ignore_errors=True)
                    message = (space_message(name=checkpoint_name(step), root=self.root, need=need, free=free,
                                             previous=latest_checkpoint(self.root)), None)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                known = classify_save_error(err, name=checkpoint_name(step), root=self.root, need=need,
                                            previous=latest_checkpoint(self.root))
                message = (str(known) if known else f"cannot create {tmp}: {err}", err.errno)
        verdict = all_gather(message, dist.group.WORLD)[0]
        if verdict is not None:
            raise CheckpointSaveError(verdict[0], code=verdict[1], path=self.root)

    def _write_small_files(self, tmp: Path, *, step: int, cfg, scheduler, extra_state) -> None:
        """RNG (every rank), config and trainer state (rank 0); errors are agreed on before Megatron's
        collectives start, so no rank is left waiting."""
        error = None
        try:
            torch.save(_rng_state(), rng_file(tmp, dist.get_rank()))
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
                write_text_atomic(tmp / TRAINER_STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        except Exception as err:  # noqa: BLE001  (re-raised on every rank below: no rank is left waiting
            # in a collective that another rank skipped)
            error = (getattr(err, "errno", None), getattr(err, "filename", None), f"{type(err).__name__}: {err}")
        first = next((e for e in all_gather(error, dist.group.WORLD) if e is not None), None)
        if first is not None:
            code, filename, text = first
            raise OSError(code, text, filename) if code is not None else RuntimeError(text)

    def _start_writers(self, request) -> None:
        """Run Megatron-Core's writer processes for `request`: forked in the background, or now.
        (The only place where the save spawns processes.)"""
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

        known = err if isinstance(err, CheckpointSaveError) else classify_save_error(
            err, name=checkpoint_name(step), root=self.root, need=need, previous=latest_checkpoint(self.root)
        )
        if isinstance(err, CheckpointException):
            # Raised on every rank (dist checkpointing broadcasts write failures), with the details on the
            # coordinator only: agree on its explanation. Not for other exceptions, which may have been
            # raised on one rank while the others wait in a collective.
            verdicts = all_gather(None if known is None else (known.message, known.errno), dist.group.WORLD)
            first = next((v for v in verdicts if v is not None), None)
            known = None if first is None else CheckpointSaveError(first[0], code=first[1], path=self.root)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return known


def _sum_over_ranks(value: int) -> int:
    return sum(all_gather(int(value), dist.group.WORLD))


def _combine_requests(requests: list, *, finalize) -> object:
    """One Megatron AsyncRequest for several `dist_checkpointing.save(..., async_sharded_save=True)`
    results: one preload (device->host copy, in the trainer), one writer process running each request's
    writer in turn, then every request's finalizers in order and `finalize` last."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    trainer_pid = os.getpid()

    def preload():
        return [r.preload_fn() if r.preload_fn is not None else None for r in requests]

    def write(_rank, staged, _unused):
        if os.getpid() != trainer_pid:  # a background writer (not execute_sync in the trainer)
            _die_with_parent(trainer_pid)
        for request, buckets in zip(requests, staged):
            if request.async_fn is None:  # nothing to write on this rank
                continue
            args = list(request.async_fn_args)
            if buckets is not None:
                args[1] = buckets
            request.async_fn(*args, **request.async_fn_kwargs)

    finalize_fns = [fn for r in requests for fn in r.finalize_fns] + [finalize]
    # AsyncRequest.execute_sync and the async callers replace argument 1 with preload()'s result.
    return AsyncRequest(write, (None, None, None), finalize_fns, preload_fn=preload)


def _die_with_parent(parent_pid: int) -> None:
    """In a background writer: ask Linux to kill this process when the trainer dies, so no writer
    outlives a killed trainer (its checkpoint could never be published anyway)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


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
        step=step, cfg=cfg, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
        extra_state=extra_state,
    )
    return result.path


# ----------------------------------------------------------------------------------------- loading


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero moments and step 0 before a checkpoint is loaded into it.

    Megatron-Core's DistributedOptimizer builds its load request from `state_dict()`, which (without apex or
    Transformer Engine) reads each parameter's `step` and fails on an optimizer that never stepped. The
    placeholders are overwritten by the loaded state.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def cfg_parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of the running job, from Megatron-Core's parallel state."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def _one_line(err: BaseException) -> str:
    """`Type: first line` of an exception; for torch's CheckpointException, of each rank's failure."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = {_one_line(pair[0] if isinstance(pair, tuple) else pair) for pair in failures.values()}
        return "; ".join(sorted(inner)) + f" (ranks {sorted(failures)})"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _read_part(ckpt: Path, part: str, read):
    """`read()`, with a failure to read checkpoint data turned into a CorruptCheckpointError naming the
    part (a damaged .distcp surfaces as EOFError, "invalid load key", a CheckpointException...)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return read()
    except CorruptCheckpointError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, CheckpointingException,
            CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CorruptCheckpointError(ckpt, part, f"cannot be loaded ({_one_line(err)})") from err


def load_training_checkpoint(
    checkpoint_dir: str | os.PathLike, *, model_chunks, optimizer=None, scheduler=None
) -> dict:
    """Collective: restore model, optimizer, scheduler and (same world size only) RNG from a folder
    written by `CheckpointSaver`; returns its trainer_state.json.

    The model and optimizer reshard to the current TP/PP. RNG streams are per rank, so they are only
    restored when the world size matches (otherwise each rank keeps its fresh seed). Unreadable data
    raises CorruptCheckpointError naming the file or part (run `verify_checkpoint` first to fall back to
    an older checkpoint instead).
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    state_path = ckpt / TRAINER_STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found: {ckpt} is not a complete training checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(ckpt, TRAINER_STATE_FILE, f"is not valid JSON ({err})") from err
    try:
        load_config(ckpt)  # validates the format version
    except (ValueError, FileNotFoundError) as err:
        raise CorruptCheckpointError(ckpt, "longgen_config.json", str(err)) from err
    loaded = _read_part(
        ckpt, "model", lambda: dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt)))
    )
    _load_model_state(model_chunks, loaded)
    if optimizer is not None:
        optim_path = ckpt / OPTIM_SUBDIR
        if not (optim_path / "metadata.json").is_file():
            raise FileNotFoundError(
                f"{optim_path} has no optimizer state; cannot resume training from {ckpt}"
            )
        fmt = state.get("optimizer_checkpoint_format", "dp_reshardable")
        saved = state.get("parallel", {})
        now = {"tensor_parallel": cfg_parallel_sizes()[0], "pipeline_parallel": cfg_parallel_sizes()[1]}
        moved = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) not in (None, v)}
        # Only the distributed optimizer's dp_reshardable layout is tied to TP/PP; the others hold global tensors.
        if fmt == "dp_reshardable" and state.get("distributed_optimizer", True) and moved:
            raise ValueError(
                f"{ckpt} saved its optimizer state as dp_reshardable at "
                + ", ".join(f"{k} {a}" for k, (a, _) in moved.items())
                + "; it cannot resume at "
                + ", ".join(f"{k} {b}" for k, (_, b) in moved.items())
                + ". Start from its weights instead (--init-checkpoint), or save with "
                "train.optimizer_checkpoint_format=fully_reshardable"
            )
        _materialize_adam_state(optimizer)
        if fmt == "fully_reshardable":
            from megatron_longgen.patches.distrib_optimizer_step import patch_fully_reshardable_step

            patch_fully_reshardable_step()
        request = optimizer.sharded_state_dict(
            model_sharded_state_dict(model_chunks), is_loading=True, metadata=_optimizer_metadata(fmt)
        )
        loaded_optim = _read_part(ckpt, OPTIM_SUBDIR, lambda: dist_checkpointing.load(request, str(optim_path)))
        with torch.no_grad():  # the state is copied into views of the (leaf) parameters
            optimizer.load_state_dict(loaded_optim)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank_rng = rng_file(ckpt, dist.get_rank())
    if state.get("world_size") == dist.get_world_size() and rank_rng.is_file():
        rel = rank_rng.relative_to(ckpt).as_posix()
        _set_rng_state(_read_part(ckpt, rel, lambda: torch.load(rank_rng, weights_only=False)))
    return state


def load_model_weights(checkpoint_dir: str | os.PathLike, *, model_chunks) -> LongGenConfig:
    """Collective: load only `DIR/model` (e.g. a converted HF checkpoint) into the model chunks,
    resharding to the current TP/PP; returns the checkpoint's config for compatibility checks."""
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    ckpt_cfg = load_config(ckpt)
    loaded = _read_part(
        ckpt, "model", lambda: dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt)))
    )
    _load_model_state(model_chunks, loaded)
    return ckpt_cfg
