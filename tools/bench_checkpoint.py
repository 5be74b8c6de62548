"""Time training-checkpoint saves (synchronous vs Megatron-Core background), manifests and verification.

    python tools/bench_checkpoint.py                                   # CPU, ~1 GB checkpoint, one process
    torchrun --nproc-per-node 8 tools/bench_checkpoint.py --hidden 4096 --layers 8 --vocab 32000   # GPUs

Builds the `debug_tiny` recipe at the given width/depth (model + Adam state after one training step,
distributed optimizer), then, in one process group:
1. a warm-up save (Megatron-Core spawns its results-queue manager on the first save: not a per-save cost);
2. `--repeats` synchronous saves: time in `save()` (= checkpoint time) and the manifest's share of it;
3. `--repeats` background saves: time in `save()` (what the training loop waits for), time to publication,
   with `--busy-steps` training steps run while the writer works (as the trainer would);
4. manifest hashing throughput over the saved files for xxh3 and crc32 (page-cache warm), and
   `verify_checkpoint` time with and without checksums;
5. `load_training_checkpoint` time.
Prints a table and writes every figure, with device, versions and date, to
`benchmarks/results/checkpoint_<device>.json` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _config(args):
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.recipes import debug_tiny

    heads = max(1, args.hidden // 64)
    return apply_overrides(
        debug_tiny(),
        [
            f"model.num_layers={args.layers}",
            f"model.layer_pattern={'F' * args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={heads}",
            f"model.ffn_hidden_size={args.ffn or 4 * args.hidden}",
            f"model.vocab_size={args.vocab}",
            "train.seq_length=128",
            "train.micro_batch_size=1",
            f"train.global_batch_size={args.world}",
            "train.eval_interval=0",
            "train.save_on_exit=false",
            "parallel.use_distributed_optimizer=true",
        ],
    )


def _hash_rate(folder: Path, algorithm: str) -> float:
    from megatron_longgen.training.checkpointing.manifest import hash_file

    files = [p for p in folder.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    for path in files:
        hash_file(path, algorithm)
    return total / 2**30 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--busy-steps", type=int, default=2, help="training steps run during a background save"
    )
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp folder)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/checkpoint_<device>.json)"
    )
    args = parser.parse_args(argv)
    args.world = int(os.environ.get("WORLD_SIZE", "1"))

    import torch
    import torch.distributed as dist

    from megatron_longgen.training.checkpointing import (
        CheckpointSaver,
        load_training_checkpoint,
        verify_checkpoint,
    )
    from megatron_longgen.training.checkpointing.manifest import checksum_algorithm, write_manifest
    from megatron_longgen.training.trainer import Trainer
    from megatron_longgen.utils.distributed import destroy
    from megatron_longgen.utils.optional import has_xxhash

    cfg = _config(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    trainer = Trainer(cfg, run_dir=root / "run", quiet=True)
    rank = dist.get_rank()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    kwargs = {
        "cfg": cfg,
        "model_chunks": trainer.model,
        "optimizer": trainer.optimizer,
        "scheduler": trainer.scheduler,
    }
    step = 0
    trainer.train_step(step)
    step += 1
    group = dist.group.WORLD

    def barrier_time(fn):
        dist.barrier()
        start = time.perf_counter()
        value = fn()
        dist.barrier()
        return time.perf_counter() - start, value

    warm = CheckpointSaver(root / "warm", async_save=False).save(step=step, **kwargs)
    rows: dict = {"checkpoint_bytes": warm.num_bytes, "warmup_save_s": warm.blocking_s}

    def drop(folder: Path) -> None:  # keep at most ~2 checkpoints on disk (a GPU box's disk is small)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()

    drop(root / "warm")

    sync_times, manifest_times = [], []
    saver = CheckpointSaver(root / "sync", async_save=False, keep_last=1)
    for _ in range(args.repeats):
        result = saver.save(step=step, **kwargs)
        sync_times.append(result.blocking_s)
        folder = result.path
        (folder / "manifest.json").unlink()  # time the manifest step alone, on the same files
        manifest_times.append(barrier_time(lambda folder=folder: write_manifest(folder, group=group))[0])
        trainer.train_step(step)
        step += 1
    rows["sync_save_s"] = statistics.median(sync_times)
    rows["manifest_s"] = statistics.median(manifest_times)
    drop(root / "sync")

    blocking, total, busy = [], [], []
    saver = CheckpointSaver(root / "async", async_save=True, keep_last=1)
    for _ in range(args.repeats):
        result = saver.save(step=step, **kwargs)
        start = time.perf_counter()
        for _ in range(args.busy_steps):
            trainer.train_step(step)
            step += 1
            saver.maybe_finalize()
        busy.append(time.perf_counter() - start)
        saver.finalize_all()
        blocking.append(result.blocking_s + result.finalize_s)
        total.append(result.total_s)
    saver.close()
    rows["async_blocking_s"] = statistics.median(blocking)
    rows["async_total_s"] = statistics.median(total)
    rows["async_busy_steps_s"] = statistics.median(busy)

    published = result.path
    if rank == 0:
        gib = rows["checkpoint_bytes"] / 2**30
        rows["hash_gib_per_s"] = {
            a: _hash_rate(published, a) for a in (["xxh3_64"] if has_xxhash() else []) + ["crc32"]
        }
        rows["manifest_s_per_gib"] = rows["manifest_s"] / gib
    rows["verify_checksums_s"] = barrier_time(lambda: verify_checkpoint(published, group=group))[0]
    rows["verify_sizes_only_s"] = barrier_time(
        lambda: verify_checkpoint(published, checksums=False, group=group)
    )[0]
    rows["load_s"] = barrier_time(
        lambda: load_training_checkpoint(published, **{k: v for k, v in kwargs.items() if k != "cfg"})
    )[0]
    params = sum(p.numel() for m in trainer.model for p in m.parameters())
    destroy()
    if rank != 0:
        return 0

    report = {
        "device": device,
        "world_size": args.world,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "checksum_algorithm": checksum_algorithm(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "model": f"debug_tiny at hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}: "
        f"{params / 1e6:.1f}M params/rank, Adam state, distributed optimizer, {cfg.train.dtype}",
        "repeats": args.repeats,
        "busy_steps": args.busy_steps,
        **rows,
    }
    out = Path(
        args.out
        or f"benchmarks/results/checkpoint_{'cpu' if not torch.cuda.is_available() else device.split()[-1].lower()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    gib = rows["checkpoint_bytes"] / 2**30
    print(f"\n{device}, world {args.world}, checkpoint {gib:.2f} GiB ({report['model']})")
    print(f"{'synchronous save (checkpoint_time_s)':<48}{rows['sync_save_s']:>9.2f} s")
    print(
        f"{'  of which the manifest (' + checksum_algorithm() + ')':<48}{rows['manifest_s']:>9.2f} s"
        f"  ({rows['manifest_s_per_gib']:.2f} s/GiB)"
    )
    print(f"{'background save: time in save() + finalize':<48}{rows['async_blocking_s']:>9.2f} s")
    print(f"{'background save: start to published':<48}{rows['async_total_s']:>9.2f} s")
    print(
        f"{'  training steps run meanwhile (' + str(args.busy_steps) + ')':<48}{rows['async_busy_steps_s']:>9.2f} s"
    )
    for algorithm, rate in rows["hash_gib_per_s"].items():
        print(f"{'hash throughput ' + algorithm + ' (page cache)':<48}{rate:>9.2f} GiB/s")
    print(f"{'verify_checkpoint, checksums':<48}{rows['verify_checksums_s']:>9.2f} s")
    print(f"{'verify_checkpoint, sizes only':<48}{rows['verify_sizes_only_s']:>9.2f} s")
    print(f"{'load_training_checkpoint':<48}{rows['load_s']:>9.2f} s")
    print(f"(load average {report['load_average_1min']:.1f} on {report['cpu_count']} cores) wrote {out}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from megatron_longgen.utils.distributed import init_distributed

    init_distributed()
    sys.exit(main())
