"""Run a function on several gloo ranks (CPU), with a timeout and guaranteed teardown.

Usage (start the workers once per test module and assert on what they return):

    def _worker(rank, world_size, arg):     # module-level, so spawn can pickle it
        ...                                 # torch.distributed is initialised (gloo)
        return {"loss": 1.0}

    results = run_distributed(_worker, world_size=2, args=("x",), timeout_s=240)
    assert results[0]["loss"] == results[1]["loss"]

Each rank runs in a fresh `spawn`ed process with RANK/WORLD_SIZE/MASTER_* set, the CPU compatibility
layer enabled and the default process group initialised. A rank that raises makes `run_distributed` raise
with that rank's traceback; a run that outlives `timeout_s` is killed and reported (gloo collectives can
hang for ever when one rank dies).
"""

from __future__ import annotations

import os
import queue
import traceback

import torch.multiprocessing as mp

from megatron_longgen.utils.distributed import free_port


def _entry(fn, rank, world_size, port, args, out_queue):
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        import warnings

        # Megatron-Core warns at import about missing apex/TE and deprecated torch APIs; in N spawned ranks
        # that noise would bury real failures in the CI log.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import torch

        torch.set_num_threads(1)
        from megatron_longgen.utils.distributed import destroy, init_distributed

        init_distributed(timeout_s=300)
        try:
            result = fn(rank, world_size, *args)
        finally:
            destroy()
        out_queue.put((rank, "ok", result))
    except BaseException:  # report every failure, including SystemExit, to the parent
        out_queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, *, world_size: int, args: tuple = (), timeout_s: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; returns the per-rank results."""
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, out_queue), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed test timed out after {timeout_s:.0f} s; finished ranks: "
                    f"{sorted(results)}, failed: {sorted(errors)}"
                )
            try:
                rank, status, payload = out_queue.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(i not in results and i not in errors for i in dead):
                    # A rank died without reporting (e.g. a segfault): give the queue a moment, then fail.
                    time.sleep(2.0)
                    if out_queue.empty():
                        raise RuntimeError(
                            f"ranks {dead} exited with codes {[procs[i].exitcode for i in dead]}"
                        ) from None
                continue
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
