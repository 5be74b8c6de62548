"""CheckpointSaver: background (Megatron-Core async) saves equal synchronous ones after loading and keep
the values of the step they were taken at; `latest` never names a folder whose writers are still running;
a trainer killed before finalizing leaves the previous checkpoint as `latest` (and no writer behind); a
full disk or an unwritable folder is one clear error on every rank, with the last good checkpoint
untouched and no partial folder left.

Two gloo ranks (data parallel, distributed optimizer) run every in-process case once for the module; the
full-disk and read-only cases use real small tmpfs mounts (skipped where mounting is not allowed) and, in
addition, writers patched to fail with ENOSPC / EACCES. The oracle for "identical" is the parameters and
optimizer state captured in memory when the save was requested.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longgen.training.checkpointing.layout import read_latest
from megatron_longgen.training.checkpointing.manifest import find_resumable_checkpoint
from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- helpers


def _state(trainer) -> dict:
    """Parameters and optimizer state as numpy arrays (comparable across processes; on CPU for CUDA runs)."""
    import torch

    out = {}
    for name, p in trainer.model[0].module.named_parameters():
        out[f"param/{name}"] = p.detach().float().cpu().numpy().copy()
    for i, group in enumerate(trainer.optimizer.optimizer.param_groups):
        for j, param in enumerate(group["params"]):
            for key, value in trainer.optimizer.optimizer.state[param].items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{i}/{j}/{key}"] = value.detach().float().cpu().numpy().copy()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _gated_writer(gate: Path):
    """Patch Megatron's background writer to wait until `gate` exists: a slow disk, under control."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    # The writers' entry point: `..._multiproc` in Megatron-Core 0.16.1, `..._multithread` in 0.19.
    name = next(n for n in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")
                if hasattr(FileSystemWriterAsync, n))  # fmt: skip
    original = getattr(FileSystemWriterAsync, name)

    def gated(*args, **kwargs):
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return original(*args, **kwargs)

    setattr(FileSystemWriterAsync, name, staticmethod(gated))
    return lambda: setattr(FileSystemWriterAsync, name, staticmethod(original))


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _expect_save_error(saver, kwargs, *, finalize: bool = False) -> str:
    from megatron_longgen.training.checkpointing.save_errors import CheckpointSaveError

    try:
        saver.save(**kwargs)
        if finalize:
            saver.finalize_all()
    except CheckpointSaveError as err:
        return str(err)
    return "no error"


# ----------------------------------------------------------------------------------------- worker


def _worker(rank, world_size, root, full_fs, ro_fs):
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(360, exit=True)  # a hang shows where it is

    import megatron_longgen.training.checkpointing.saver as saver_module
    from megatron_longgen.training.checkpointing import CheckpointSaver, load_training_checkpoint
    from megatron_longgen.training.trainer import Trainer

    root = Path(root)
    cfg = tiny_config("train.max_steps=20", "train.save_on_exit=false")
    trainer = Trainer(cfg, run_dir=root / "run", quiet=True)
    out: dict = {}
    for step in range(2):
        trainer.train_step(step)
    at_step_2 = _state(trainer)
    kwargs = {
        "cfg": cfg,
        "model_chunks": trainer.model,
        "optimizer": trainer.optimizer,
        "scheduler": trainer.scheduler,
    }

    # -- sync vs async, with a slow writer and training continuing while it writes
    sync = CheckpointSaver(root / "sync", async_save=False).save(step=2, **kwargs)
    out["sync"] = (sync.done, sync.blocking_s, sync.total_s)
    gate = root / "gate"
    restore = _gated_writer(gate)
    saver = CheckpointSaver(root / "async", async_save=True, keep_last=2)
    pending = saver.save(step=2, **kwargs)
    out["pending"] = (pending.done, pending.asynchronous, pending.blocking_s)
    in_flight = []
    for step in range(2, 4):  # the weights move on while the writer waits
        trainer.train_step(step)
        in_flight.append((saver.maybe_finalize(), read_latest(root / "async"), _listing(root / "async")))
    out["in_flight"] = [(len(done), latest, listing) for done, latest, listing in in_flight]
    dist.barrier()
    if rank == 0:
        gate.touch()
    finished = saver.finalize_all()
    restore()
    out["finished"] = [(r.step, r.done, r.path.name, r.num_bytes is not None, r.total_s) for r in finished]
    out["after_finalize"] = (read_latest(root / "async"), _listing(root / "async"))
    at_step_4 = _state(trainer)

    load_training_checkpoint(
        root / "async" / "step_0000002",
        model_chunks=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
    )
    from_async = _state(trainer)
    load_training_checkpoint(
        root / "sync" / "step_0000002",
        model_chunks=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
    )
    from_sync = _state(trainer)
    out["async_equals_sync"] = _same(from_async, from_sync)
    out["async_equals_step_2"] = _same(from_async, at_step_2)
    out["step_4_differs"] = not _same(at_step_4, at_step_2)

    # -- several background saves: each save() publishes the previous one first; rotation keeps 2
    for step in (3, 4, 5):
        trainer.train_step(step)
        saver.save(step=step + 1, **kwargs)
    saver.close()
    out["rotation"] = (read_latest(root / "async"), _listing(root / "async"))

    # -- a writer that fails with ENOSPC / a rank that cannot write its RNG file: both ranks get the
    #    same explanation, the previous checkpoint stays, the partial folder goes
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original_write = FileSystemWriterAsync.write_preloaded_data

    def no_space(transform_list, local_proc_idx, write_bucket, results_queue, count_queue, use_fsync, **kw):
        err = OSError(errno.ENOSPC, "No space left on device", write_bucket[0])
        if results_queue is None:  # Megatron-Core 0.19 writes the last bucket in the calling thread
            return local_proc_idx, err
        results_queue.put((local_proc_idx, err))
        count_queue.get()
        count_queue.task_done()
        return None

    from megatron_longgen.compat.mcore import mcore_at_least
    from megatron_longgen.training.checkpointing import save_errors

    FileSystemWriterAsync.write_preloaded_data = staticmethod(no_space)
    original_free = save_errors.free_bytes
    if mcore_at_least("0.19"):
        # Megatron-Core 0.19 reports a writer's exception by its class alone ("error: <class 'OSError'>"):
        # the errno is gone, and a full disk is recognised by its free space, as on a real full disk.
        save_errors.free_bytes = lambda path: 4096
    for mode in (False, True):
        out[f"patched_enospc_{mode}"] = _expect_save_error(
            CheckpointSaver(root / "sync", async_save=mode), dict(step=7, **kwargs), finalize=mode
        )
    FileSystemWriterAsync.write_preloaded_data = staticmethod(original_write)
    save_errors.free_bytes = original_free
    dist.barrier()  # rank 0 removes the partial folder
    out["patched_enospc_left"] = (read_latest(root / "sync"), _listing(root / "sync"))

    original_save = saver_module.torch.save

    def denied(obj, path, *args, **kw):
        if rank == 1 and "rng" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return original_save(obj, path, *args, **kw)

    saver_module.torch.save = denied
    out["patched_eacces"] = _expect_save_error(
        CheckpointSaver(root / "sync", async_save=False), dict(step=8, **kwargs)
    )
    saver_module.torch.save = original_save
    dist.barrier()
    out["patched_eacces_left"] = (read_latest(root / "sync"), _listing(root / "sync"))

    # -- a real full disk: refused up front, from the size estimate, on every rank
    if full_fs:
        full = Path(full_fs) / "ckpts"
        first = CheckpointSaver(full, async_save=False).save(step=2, **kwargs)
        out["full_first"] = (first.done, first.num_bytes)
        out["full_preflight"] = _expect_save_error(
            CheckpointSaver(full, async_save=False), dict(step=3, **kwargs)
        )
        dist.barrier()
        out["full_preflight_left"] = (read_latest(full), _listing(full))
    if ro_fs:
        out["read_only"] = _expect_save_error(
            CheckpointSaver(Path(ro_fs) / "ckpts", async_save=False), dict(step=2, **kwargs)
        )
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """A 6 MiB tmpfs (room for one tiny checkpoint, not two) and a read-only tmpfs; None each where
    mounting is not allowed (not root / no CAP_SYS_ADMIN)."""
    base = tmp_path_factory.mktemp("mounts")
    made, reasons = {}, []
    for name, options in (("full", "size=6m"), ("ro", "ro,size=1m")):
        point = base / name
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            made[name] = point
        else:
            reasons.append(f"mount -t tmpfs: {result.stderr.strip() or result.returncode}")
    yield made, reasons
    for point in made.values():
        subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory, mounts):
    made, _ = mounts
    root = tmp_path_factory.mktemp("saver")
    args = (str(root), str(made.get("full") or ""), str(made.get("ro") or ""))
    return run_distributed(_worker, world_size=2, args=args, timeout_s=400)


# ------------------------------------------------------------------------------------------- tests


def test_async_save_loads_bit_identical_to_sync_and_to_the_saved_step(results):
    for out in results:
        assert out["step_4_differs"], "training did not move the weights while the writer was blocked"
        assert out["async_equals_sync"]
        assert out["async_equals_step_2"]


def test_latest_never_names_a_folder_still_being_written(results):
    for out in results:
        done, asynchronous, _ = out["pending"]
        assert asynchronous and not done
        for num_done, latest, listing in out["in_flight"]:
            assert num_done == 0 and latest is None
            assert listing == [".tmp_step_0000002"]
        assert out["finished"][0][:4] == (2, True, "step_0000002", True)
        assert out["after_finalize"] == ("step_0000002", ["latest", "step_0000002"])


def test_save_times_are_reported(results):
    out = results[0]
    done, blocking, total = out["sync"]
    assert done and 0 < blocking and total == blocking
    _, _, async_blocking = out["pending"]
    assert 0 < async_blocking
    assert out["finished"][0][4] >= async_blocking  # published only after the gate opened


def test_background_saves_publish_in_order_and_rotate(results):
    for out in results:
        assert out["rotation"] == ("step_0000006", ["latest", "step_0000005", "step_0000006"])


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
def test_writer_out_of_space_is_one_clear_error_on_every_rank(results, mode):
    messages = {out[f"patched_enospc_{mode}"] for out in results}
    assert len(messages) == 1, f"ranks disagree: {messages}"
    message = messages.pop()
    assert (
        message.startswith("cannot save checkpoint step_0000007 in ")
        and "no space left on the device" in message
    )
    assert "the checkpoint needs about" in message and "free there" in message
    assert "step_0000002 is untouched and the partial save was removed" in message
    for out in results:
        assert out["patched_enospc_left"] == ("step_0000002", ["latest", "step_0000002"])


def test_rank_that_cannot_write_makes_every_rank_stop_with_the_path(results):
    messages = {out["patched_eacces"] for out in results}
    assert len(messages) == 1, f"ranks disagree: {messages}"
    message = messages.pop()
    assert message.startswith("cannot save checkpoint step_0000008: Permission denied writing ")
    assert message.split(" writing ")[1].split(". ")[0].endswith(".tmp_step_0000008/rng/rank_00001.pt")
    assert "Make " in message and "writable or use another --run-dir" in message
    for out in results:
        assert out["patched_eacces_left"] == ("step_0000002", ["latest", "step_0000002"])


def test_real_full_disk_is_refused_before_writing(results, mounts):
    made, reasons = mounts
    if "full" not in made:
        pytest.skip(f"cannot mount a small tmpfs here ({'; '.join(reasons)})")
    for out in results:
        done, num_bytes = out["full_first"]
        assert done and 3 * 2**20 < num_bytes < 6 * 2**20
        message = out["full_preflight"]
        assert message.startswith("cannot save checkpoint step_0000003 in ") and "no space left" in message
        need = float(message.split("needs about ")[1].split(" MiB")[0])
        free = float(message.split(", ")[1].split(" MiB free")[0])
        assert free < need and num_bytes <= need * 2**20 < 1.25 * num_bytes  # the estimate is close, not low
        assert out["full_preflight_left"] == ("step_0000002", ["latest", "step_0000002"])


def _full_disk_worker(rank, world_size, full_fs):
    """One rank: Megatron-Core's coordinator writes its `.metadata` before it tells the other ranks about
    write failures, so a disk that fills up *during* a save can fail on rank 0 alone (the job then ends
    through torchrun / srun with rank 0's message). One rank shows the message and the clean-up."""
    import megatron_longgen.training.checkpointing.saver as saver_module
    from megatron_longgen.training.checkpointing import CheckpointSaver
    from megatron_longgen.training.trainer import Trainer

    full = Path(full_fs) / "ckpts"
    cfg = tiny_config("train.max_steps=5", "train.save_on_exit=false")
    trainer = Trainer(cfg, run_dir=Path(full_fs).parent / "run", quiet=True)
    trainer.train_step(0)
    kwargs = {
        "cfg": cfg,
        "model_chunks": trainer.model,
        "optimizer": trainer.optimizer,
        "scheduler": trainer.scheduler,
    }
    out = {"first": CheckpointSaver(full, async_save=False).save(step=1, **kwargs).done}
    saver_module.free_bytes = lambda path: 2**50  # the pre-flight believes there is room
    for mode in (False, True):
        out[f"writer_{mode}"] = _expect_save_error(
            CheckpointSaver(full, async_save=mode), dict(step=2, **kwargs), finalize=mode
        )
        out[f"left_{mode}"] = (read_latest(full), _listing(full))
    return out


def test_real_full_disk_during_the_write(tmp_path):
    point = tmp_path / "full"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        (out,) = run_distributed(_full_disk_worker, world_size=1, args=(str(point),), timeout_s=300)
    finally:
        subprocess.run(["umount", str(point)], check=False)
    assert out["first"]
    for mode in (False, True):
        message = out[f"writer_{mode}"]
        assert message.startswith("cannot save checkpoint step_0000002 in ") and "no space left" in message
        assert "step_0000001 is untouched and the partial save was removed" in message
        assert out[f"left_{mode}"] == ("step_0000001", ["latest", "step_0000001"])


def test_real_read_only_folder(results, mounts):
    made, reasons = mounts
    if "ro" not in made:
        pytest.skip(f"cannot mount a read-only tmpfs here ({'; '.join(reasons)})")
    for out in results:
        message = out["read_only"]
        assert message.startswith("cannot save checkpoint step_0000002: Read-only file system writing ")
        assert "no earlier checkpoint exists" in message
    assert _listing(made["ro"]) == []


# ------------------------------------------------------------------------- killed before finalize

_KILLED = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.training.test_checkpoint_saver import _gated_writer
from tests.training.tiny import tiny_config
from megatron_longgen.utils.distributed import init_distributed
init_distributed()
import psutil
from megatron_longgen.training.checkpointing import CheckpointSaver
from megatron_longgen.training.trainer import Trainer
root = Path({root!r})
cfg = tiny_config("train.max_steps=5", "train.save_on_exit=false")
trainer = Trainer(cfg, run_dir=root / "run", quiet=True)
kwargs = dict(cfg=cfg, model_chunks=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
trainer.train_step(0)
saver = CheckpointSaver(root / "ckpts", async_save=True)
saver.save(step=1, **kwargs)
saver.finalize_all()
trainer.train_step(1)
_gated_writer(root / "never")
before = {{p.pid for p in psutil.Process().children(recursive=True)}}
saver.save(step=2, **kwargs)
writers = [p.pid for p in psutil.Process().children() if p.pid not in before]
print("SCHEDULED", *writers, flush=True)
time.sleep(600)
"""


def test_trainer_killed_before_finalize_keeps_previous_latest_and_no_writer(tmp_path):
    import psutil

    script = _KILLED.format(repo=str(REPO), root=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        line = ""
        while not line.startswith("SCHEDULED"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"script ended early ({proc.returncode})"
            assert time.monotonic() < deadline, "timed out waiting for the background save"
        writers = [int(pid) for pid in line.split()[1:]]
        assert writers, "no background writer process was started"
        proc.kill()  # the trainer only, not its process group: the writer must go by itself
        proc.wait(timeout=30)
        gone = time.monotonic() + 30
        while any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in writers
        ):
            assert time.monotonic() < gone, f"background writers {writers} outlived the killed trainer"
            time.sleep(0.1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # e.g. Megatron's results-queue manager process
        except ProcessLookupError:
            pass
    ckpts = tmp_path / "ckpts"
    assert read_latest(ckpts) == "step_0000001"
    assert _listing(ckpts) == [".tmp_step_0000002", "latest", "step_0000001"]
    path, skipped = find_resumable_checkpoint(ckpts)
    assert path == ckpts / "step_0000001" and skipped == []
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 1


# --------------------------------------------------------------------------------------------- GPU


def _gpu_worker(rank, world_size, root):
    """On CUDA: the background save copies the tensors to host memory before forking the writer, so
    training that continues on the GPU meanwhile does not leak into the checkpoint."""
    import torch

    from megatron_longgen.training.checkpointing import CheckpointSaver, load_training_checkpoint
    from megatron_longgen.training.trainer import Trainer

    assert torch.cuda.is_available()
    root = Path(root)
    # All-full layers: this test is about the checkpoint path, not the sparse kernels' GPU backends.
    cfg = tiny_config("train.max_steps=10", "train.save_on_exit=false", pattern="FFFF")
    trainer = Trainer(cfg, run_dir=root / "run", quiet=True)
    kwargs = {
        "cfg": cfg,
        "model_chunks": trainer.model,
        "optimizer": trainer.optimizer,
        "scheduler": trainer.scheduler,
    }
    for step in range(2):
        trainer.train_step(step)
    at_step_2 = _state(trainer)
    CheckpointSaver(root / "sync", async_save=False).save(step=2, **kwargs)
    gate = root / "gate"
    restore = _gated_writer(gate)
    saver = CheckpointSaver(root / "async")
    assert saver.async_save, "background saves are the default on CUDA"
    pending = saver.save(step=2, **kwargs)
    for step in range(2, 4):
        trainer.train_step(step)
    in_flight = (pending.done, read_latest(root / "async"))
    gate.touch()
    saver.close()
    restore()
    moved = not _same(_state(trainer), at_step_2)
    load_training_checkpoint(
        root / "async" / "step_0000002", **{k: v for k, v in kwargs.items() if k != "cfg"}
    )
    from_async = _state(trainer)
    load_training_checkpoint(
        root / "sync" / "step_0000002", **{k: v for k, v in kwargs.items() if k != "cfg"}
    )
    return {
        "in_flight": in_flight,
        "moved": moved,
        "async_equals_step_2": _same(from_async, at_step_2),
        "sync_equals_step_2": _same(_state(trainer), at_step_2),
        "blocking_s": pending.blocking_s,
    }


@pytest.mark.gpu
def test_gpu_background_save_is_the_saved_step(tmp_path):
    (out,) = run_distributed(_gpu_worker, world_size=1, args=(str(tmp_path),), timeout_s=600)
    assert out["in_flight"] == (False, None)
    assert out["moved"] and out["async_equals_step_2"] and out["sync_equals_step_2"]
