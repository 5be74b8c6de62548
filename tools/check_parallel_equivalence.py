"""TP x PP x CP (+ DP, sequence parallelism and the distributed optimizer) against one process: losses,
gradients, weights and a checkpoint resumed at TP1 x PP1 x CP1. (A self-contained CLI, hence its length: the
parallel run, the single-process reference, the comparison rules and the report.)

    torchrun --nproc-per-node 8 tools/check_parallel_equivalence.py --tp 2 --pp 2 --cp 2
    torchrun --nproc-per-node 8 tools/check_parallel_equivalence.py --tiny --tp 2 --pp 2 --cp 2   # CPU, gloo

The model is small (8 layers `SSFFFFSS` by default: sparse layers through the KV-reduced exchange, full
layers through ring attention under CP) and trained through the project's `Trainer`, on the shipped corpus.
Every run starts from the same weights and reads the same global batches:

1. parallel, `tp x pp x cp` (DP is what is left of the world), plain optimizer, no clipping, one step:
   the loss, the gradient norm and the gradient of every parameter, gathered to TP1/PP1 form;
2. parallel, distributed optimizer (`fully_reshardable` checkpoints), clipping at 1.0: `fit()` for K steps
   (checkpoint on exit at step K), then K2 more `train_step`s: losses, grad norms, weights after K and
   after K + K2 steps;
3. one process (rank 0 starts this script again with world size 1 — on GPU, rank 0's GPU): runs 1 and 2 at
   TP1 x PP1 x CP1 (the reference), and run 2's checkpoint resumed at TP1 x PP1 x CP1 (`restore(resume=True,
   allow_changes=("layout",))`): its weights must equal the parallel weights at step K bit for bit, and the
   K2 steps after it must reproduce the parallel run's losses and final weights (this needs the optimizer's
   Adam moments and step count back, not just the weights).
The initial weights are run 1's (saved at the parallel layout, loaded everywhere else with resharding).

Tolerances (per-tensor errors are relative Frobenius norms ||x - ref|| / ||ref||):
- fp32 (`--dtype fp32`, the CPU default): losses and grad norms within rtol 1e-5; gradients and weights
  within 1e-4 (a wrong TP slice, a missed reduction or a lost optimizer moment gives errors of order 1e-2..1);
  the resumed weights exactly (0).
- bf16 (the GPU default): STYLE rule 5 — the single process also runs in fp32 (the gold; sparse layers on the
  `torch` kernel), and each bf16 figure of the parallel run must lie within 3x the single-GPU bf16 run's error
  against that gold, plus 2^-8 (bf16's unit roundoff) relative: |par - gold| <= 3 |single - gold| + 2^-8 |gold|.
  The resumed weights must still equal the saved ones exactly; the steps after the resume (both bf16, same start)
  must stay within 3x the distance between the single-process and the parallel bf16 runs, plus 2^-8.

Writes `benchmarks/results/parallel_equivalence_tp{T}_pp{P}_cp{C}_<device>.json` (every check with its error
and bound) and prints one line per check; exits 1 when a check fails. `--reference-dir DIR` compares against a
saved reference instead: the work dir of an earlier run kept with `--keep-work-dir` (its `init/` weights and
`reference.pt`), which must use the same model, data and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

BF16_ROUNDOFF = 2.0**-8
FP32_LOSS_RTOL = 1e-5
FP32_TENSOR_RTOL = 1e-4
BF16_FACTOR = 3.0
SIZES = {
    # CPU: seconds per step on 8 gloo ranks. 16-token blocks keep the S layers sparse at 128 tokens.
    "tiny": {
        "hidden": 64,
        "heads": 4,
        "groups": 2,
        "ffn": 128,
        "seq": 128,
        "block": 16,
        "window": 2,
        "stride": 3,
        "local": 2,
    },
    # GPU: head dim 64 and 64-token blocks, the shapes the fast kernels take.
    "small": {
        "hidden": 256,
        "heads": 4,
        "groups": 2,
        "ffn": 704,
        "seq": 2048,
        "block": 64,
        "window": 4,
        "stride": 8,
        "local": 1,
    },
}
_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """What a check runs; the same object drives the parallel and the single-process side."""

    tp: int
    pp: int
    cp: int
    dtype: str = "fp32"
    size: str = "tiny"
    pattern: str = "SSFFFFSS"
    variant: str = "sink_window"
    backend: str = "auto"
    gold_backend: str = "torch"
    steps_before_save: int = 2
    steps_after_save: int = 2
    global_batch_size: int = 4


def equivalence_config(
    opts: Options,
    *,
    tp: int,
    pp: int,
    cp: int,
    dtype: str | None = None,
    distributed_optimizer: bool,
    init_checkpoint: str | None = None,
):
    """The run config at one layout: debug_tiny's data and tokenizer, `opts.pattern` at `opts.size`,
    sequence parallelism whenever TP > 1, constant LR without warm-up (every step moves the weights)."""
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.recipes import debug_tiny

    s = SIZES[opts.size]
    dtype = dtype or opts.dtype
    backend = opts.gold_backend if (dtype == "fp32" and opts.dtype != "fp32") else opts.backend
    base = debug_tiny()
    model = dataclasses.replace(base.model, num_layers=len(opts.pattern), layer_pattern=opts.pattern)
    cfg = dataclasses.replace(base, name=f"equivalence_tp{tp}_pp{pp}_cp{cp}", model=model)
    return apply_overrides(
        cfg,
        [
            f"model.hidden_size={s['hidden']}",
            f"model.num_attention_heads={s['heads']}",
            f"model.num_query_groups={s['groups']}",
            f"model.ffn_hidden_size={s['ffn']}",
            f"sparse.variant={opts.variant}",
            f"sparse.block_size={s['block']}",
            "sparse.num_sink_blocks=1",
            f"sparse.num_window_blocks={s['window']}",
            f"sparse.stride_blocks={s['stride']}",
            f"sparse.num_local_blocks={s['local']}",
            f"sparse.backend={backend}",
            f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}",
            f"parallel.context_parallel={cp}",
            f"parallel.sequence_parallel={tp > 1}",
            f"parallel.use_distributed_optimizer={distributed_optimizer}",
            f"train.seq_length={s['seq']}",
            "train.micro_batch_size=1",
            f"train.global_batch_size={opts.global_batch_size}",
            f"train.max_steps={opts.steps_before_save + opts.steps_after_save}",
            "train.lr=1e-3",
            "train.min_lr=1e-3",
            "train.lr_warmup_steps=0",
            "train.lr_decay_style=constant",
            f"train.clip_grad={1.0 if distributed_optimizer else 0.0}",
            f"train.dtype={dtype}",
            "train.log_interval=1",
            "train.eval_interval=0",
            "train.save_interval=0",
            "train.save_on_exit=true",
            "train.optimizer_checkpoint_format=fully_reshardable",
            f"train.init_checkpoint={init_checkpoint}",
            "data.valid_fraction=0.0",
        ],
    )


# ----------------------------------------------------------------------------------------- global tensors
def _merge_tp(name: str, parts: list, partition_dim: int):
    """Concatenate TP shards. SwiGLU's fused fc1 holds [gate slice; up slice] on each rank, so the global
    [gate; up] is rebuilt half by half; linear_qkv's rows are grouped by query group, which TP keeps whole."""
    import torch

    if "linear_fc1" in name and partition_dim == 0:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=partition_dim)


def _global_name(module, name: str) -> str:
    """Parameter name in the whole model: a pipeline stage's `decoder.layers.i` becomes the global index."""
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{module.decoder.layers[int(index)].layer_number - 1}.{rest}"


def global_tensors(trainer, *, grads: bool) -> dict | None:
    """Collective over the world: every parameter (`grads=False`) or its reduced gradient (`main_grad`, the
    plain optimizer's full buffer) in TP1/PP1 form, as fp32 numpy arrays, on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist

    tp_group, tp = trainer.pgs.tp, trainer.pgs.tp.size()
    local = {}
    for chunk in trainer.model:
        module = chunk.module
        for name, p in module.named_parameters():
            t = (p.main_grad if grads else p).detach().float().contiguous()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t, group=tp_group)
                t = _merge_tp(name, parts, p.partition_dim)
            # numpy by value: tensors would cross process boundaries through shared memory.
            local[_global_name(module, name)] = t.cpu().numpy().copy()
    return _gather_to_rank0(local, merge=True)


def _gather_to_rank0(obj, *, merge: bool = False):
    import torch.distributed as dist

    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    if out is None or not merge:
        return out
    merged = {}
    for part in out:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def _from_logging_rank(trainer, value):
    """`value` as the metrics rank (last pipeline stage, first TP/CP/DP rank) has it, on rank 0."""
    got = _gather_to_rank0((trainer.is_logging_rank, value))
    return None if got is None else next(v for is_logger, v in got if is_logger)


def _grad_norms(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["grad_norm"] for line in lines]


# ----------------------------------------------------------------------------------------- one layout
def run_layout(
    work: Path, opts: Options, *, tp: int, pp: int, cp: int, dtype: str, tag: str, init_dir: Path | None
) -> dict | None:
    """Collective: runs 1 and 2 of the module docstring at one layout; the results on rank 0.

    Without `init_dir`, run 1's initial weights are saved to `work/init` and used by run 2."""
    import torch.distributed as dist

    from megatron_longgen.training.checkpointing import save_training_checkpoint
    from megatron_longgen.training.trainer import Trainer

    k1, k2 = opts.steps_before_save, opts.steps_after_save
    init = None if init_dir is None else str(init_dir / "step_0000000")
    grads_run = Trainer(
        equivalence_config(
            opts, tp=tp, pp=pp, cp=cp, dtype=dtype, distributed_optimizer=False, init_checkpoint=init
        ),
        run_dir=work / f"{tag}_grads",
        quiet=True,
    )
    if init_dir is None:
        save_training_checkpoint(
            checkpoints_dir=work / "init", step=0, cfg=grads_run.cfg, model_chunks=grads_run.model
        )
        init = str(work / "init" / "step_0000000")
    else:
        grads_run.restore(resume=False)  # loads train.init_checkpoint
    metrics = grads_run.train_step(0)
    pgs = grads_run.pgs
    out = {
        "layout_seen": {
            "tp": pgs.tp.size(),
            "pp": pgs.pp.size(),
            "cp": pgs.cp.size(),
            "dp": pgs.dp.size(),
            "world": grads_run.world_size,
        },
        "grads_loss": _from_logging_rank(grads_run, metrics["loss"]),
        "grads_grad_norm": metrics["grad_norm"],
        "grads": global_tensors(grads_run, grads=True),
    }
    del grads_run

    run_dir = work / f"{tag}_train"
    cfg = equivalence_config(
        opts, tp=tp, pp=pp, cp=cp, dtype=dtype, distributed_optimizer=True, init_checkpoint=init
    )
    trainer = Trainer(cfg, run_dir=run_dir, quiet=True)
    result = trainer.fit(stop_after_steps=k1)  # the production path: init weights, k1 steps, save on exit
    out["weights_saved"] = global_tensors(trainer, grads=False)
    losses, norms = list(result.losses), []
    for step in range(k1, k1 + k2):
        metrics = trainer.train_step(step)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    out["weights_end"] = global_tensors(trainer, grads=False)
    losses = _from_logging_rank(trainer, losses)
    dist.barrier()
    if dist.get_rank() == 0:
        out.update(
            losses=losses, grad_norms=_grad_norms(run_dir) + norms, checkpoint=str(result.checkpoint_dir)
        )
        return out
    return None


def resume_single(work: Path, opts: Options) -> dict:
    """One process: the parallel run's step-K checkpoint resumed at TP1 x PP1 x CP1, then K2 steps."""
    from megatron_longgen.training.trainer import Trainer

    k1, k2 = opts.steps_before_save, opts.steps_after_save
    cfg = equivalence_config(opts, tp=1, pp=1, cp=1, distributed_optimizer=True)
    trainer = Trainer(cfg, run_dir=work / "parallel_train", quiet=True)
    start, _ = trainer.restore(resume=True, allow_changes=("layout",))
    if start != k1:
        raise RuntimeError(f"resumed at step {start}, expected the checkpoint of step {k1}")
    out = {"weights_loaded": global_tensors(trainer, grads=False), "losses": []}
    for step in range(k1, k1 + k2):
        out["losses"].append(trainer.train_step(step)["loss"])
    out["weights_end"] = global_tensors(trainer, grads=False)
    return out


def run_single(work: Path, opts: Options, *, reference_dir: Path | None) -> dict:
    """One process (world size 1): the reference runs (or a saved reference) and the resume."""
    import torch

    if reference_dir is not None:
        saved = torch.load(reference_dir / "reference.pt", weights_only=False)
        if saved["options"] != _identity(opts):
            raise ValueError(f"{reference_dir} was made for {saved['options']}, not {_identity(opts)}")
        reference = saved["runs"]
    else:
        dtypes = [opts.dtype] + (["fp32"] if opts.dtype != "fp32" else [])
        init = work / "init"
        reference = {
            d: run_layout(work, opts, tp=1, pp=1, cp=1, dtype=d, tag=f"single_{d}", init_dir=init)
            for d in dtypes
        }
        torch.save({"options": _identity(opts), "runs": reference}, work / "reference.pt")
    return {"reference": reference, "resume": resume_single(work, opts)}


def _identity(opts: Options) -> dict:
    """What a saved reference must share with the run it is compared with (everything but the layout)."""
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("tp", "pp", "cp")}


# ----------------------------------------------------------------------------------------- comparison
def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check(name: str, err: float, bound: float) -> dict:
    return {"name": name, "err": err, "bound": bound, "ok": bool(err <= bound)}


def _aligned(got, want) -> list[tuple[str, object, object]]:
    """(label, got item, wanted item) for two {tensor name: array} dicts or two lists of scalars."""
    if isinstance(want, dict):
        return [(f"[{k}]", got.get(k), want[k]) for k in sorted(want)]
    return [(f"[{i}]", g, w) for i, (g, w) in enumerate(zip(got, want))]


def compare_values(name: str, got, want, *, rtol: float = 0.0, noise: tuple | None = None) -> list[dict]:
    """Checks of `got` against `want` (a scalar, a list of scalars or a {tensor name: array} dict), item by
    item. The bound is `rtol`, or with `noise = (single, gold)` (bf16 mode: the single-process bf16 run and
    the fp32 gold, shaped like `want`) 3 x rel_err(single, gold) + 2^-8 per item."""
    if not isinstance(want, (dict, list, tuple)):
        got, want = [got], [want]
        noise = None if noise is None else ([noise[0]], [noise[1]])
    count = len(want)
    same = set(got) == set(want) if isinstance(want, dict) else len(got) == count
    checks = [_check(f"{name}: {count} items, same set", 0.0 if same else 1.0, 0.0)]
    bounds = (
        [rtol] * count
        if noise is None
        else [BF16_FACTOR * rel_err(s, g) + BF16_ROUNDOFF for _, s, g in _aligned(*noise)]
    )
    for (label, g, w), bound in zip(_aligned(got, want), bounds):
        checks.append(_check(name + label, math.inf if g is None else rel_err(g, w), bound))
    return checks


def compare(parallel: dict, single: dict, *, dtype: str) -> list[dict]:
    """Every check of the module docstring, as {name, err, bound, ok} dicts (`parallel`: `run_layout`'s
    result at the parallel layout; `single`: `run_single`'s)."""
    ref = single["reference"][dtype]
    gold = single["reference"].get("fp32") if dtype != "fp32" else None
    resumed = single["resume"]
    k1 = len(parallel["losses"]) - len(resumed["losses"])

    def against_reference(name: str, key: str, rtol: float) -> list[dict]:
        if gold is None:
            return compare_values(name, parallel[key], ref[key], rtol=rtol)
        return compare_values(name, parallel[key], gold[key], noise=(ref[key], gold[key]))

    def against_parallel(name: str, got, key: str, rtol: float, *, after: int = 0) -> list[dict]:
        want = parallel[key][after:] if after else parallel[key]
        if gold is None:
            return compare_values(name, got, want, rtol=rtol)
        # Both bf16, from the same weights and optimizer state, at two layouts: as close as the single-process
        # bf16 run stays to the parallel one (the same two layouts, over the same steps and more).
        cut = (lambda x: x[after:]) if after else (lambda x: x)
        return compare_values(name, got, want, noise=(cut(ref[key]), want))

    checks = []
    checks += against_reference("run 1 loss", "grads_loss", FP32_LOSS_RTOL)
    checks += against_reference("run 1 grad norm", "grads_grad_norm", FP32_LOSS_RTOL)
    checks += against_reference("run 1 gradient", "grads", FP32_TENSOR_RTOL)
    checks += against_reference("run 2 losses", "losses", FP32_LOSS_RTOL)
    checks += against_reference("run 2 grad norms", "grad_norms", FP32_LOSS_RTOL)
    checks += against_reference("run 2 weights at the checkpoint", "weights_saved", FP32_TENSOR_RTOL)
    checks += against_reference("run 2 final weights", "weights_end", FP32_TENSOR_RTOL)
    # The resume starts from the saved tensors themselves: any difference is a resharding bug.
    checks += compare_values("resume: loaded weights", resumed["weights_loaded"], parallel["weights_saved"])
    checks += against_parallel("resume: losses after", resumed["losses"], "losses", FP32_LOSS_RTOL, after=k1)
    checks += against_parallel(
        "resume: final weights", resumed["weights_end"], "weights_end", FP32_TENSOR_RTOL
    )
    return checks


# ----------------------------------------------------------------------------------------- CLI
def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions["megatron_core"] = version("megatron-core")
    except PackageNotFoundError:
        versions["megatron_core"] = None
    return versions


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _single_process_env() -> dict:
    """This environment without the launcher's rank variables, on rank 0's GPU only."""
    # TORCHELASTIC_USE_AGENT_STORE in particular makes a tcp:// rendezvous join torchrun's store as a client,
    # which a world-size-1 process would wait on for ever.
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("TORCHELASTIC_")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(local)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="CPU sizes (width 64, 128 tokens); default on CPU")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--pattern", default="SSFFFFSS")
    p.add_argument("--sparse-variant", default="sink_window", choices=("sink_window", "block_strided"))
    p.add_argument("--sparse-backend", default="auto", help="kernel of the S layers in the checked runs")
    p.add_argument("--steps-before-save", type=int, default=2)
    p.add_argument("--steps-after-save", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument(
        "--work-dir", default=None, help="where runs and checkpoints go (default: a temporary dir)"
    )
    p.add_argument("--keep-work-dir", action="store_true", help="keep it (reusable with --reference-dir)")
    p.add_argument(
        "--reference-dir", default=None, help="a kept work dir: reuse its init weights and reference"
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/parallel_equivalence_...)"
    )
    p.add_argument(
        "--single-process-timeout", type=float, default=1800.0, help="seconds for rank 0's child run"
    )
    p.add_argument(
        "--single-process", action="store_true", help=argparse.SUPPRESS
    )  # internal: rank 0's child
    return p


def options_from_args(args, *, cuda: bool) -> Options:
    return Options(
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        size="tiny" if (args.tiny or not cuda) else "small",
        pattern=args.pattern,
        variant=args.sparse_variant,
        backend=args.sparse_backend,
        steps_before_save=args.steps_before_save,
        steps_after_save=args.steps_after_save,
        global_batch_size=args.global_batch_size,
    )


def _print_report(checks: list[dict], *, header: str) -> None:
    print(header)
    for c in checks:
        flag = "ok  " if c["ok"] else "FAIL"
        print(f"  {flag} {c['name']:<70} err {c['err']:.3g}  bound {c['bound']:.3g}")
    failed = sum(not c["ok"] for c in checks)
    print(f"{len(checks) - failed}/{len(checks)} checks passed" + (f", {failed} FAILED" if failed else ""))


def main(argv: list[str] | None = None) -> int:
    import torch

    args = _parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    opts = options_from_args(args, cuda=cuda)
    reference_dir = Path(args.reference_dir) if args.reference_dir else None
    if args.single_process:  # rank 0's child: world size 1
        from megatron_longgen.utils.distributed import destroy, init_distributed

        work = Path(args.work_dir)
        init_distributed()
        try:
            torch.save(run_single(work, opts, reference_dir=reference_dir), work / "single.pt")
        finally:
            destroy()
        return 0

    from megatron_longgen.utils.distributed import destroy, init_distributed

    rank, world = init_distributed()
    model_parallel = opts.tp * opts.pp * opts.cp
    if world % model_parallel:
        raise SystemExit(f"world size {world} must be a multiple of tp*pp*cp = {model_parallel}")
    import torch.distributed as dist

    made_work = args.work_dir is None
    box = [args.work_dir or (tempfile.mkdtemp(prefix="equivalence_") if rank == 0 else None)]
    dist.broadcast_object_list(box, src=0)  # one node: the ranks share the file system
    work = Path(box[0])
    if reference_dir is not None and rank == 0:
        shutil.copytree(reference_dir / "init", work / "init", dirs_exist_ok=True)
    dist.barrier()
    parallel = run_layout(
        work,
        opts,
        tp=opts.tp,
        pp=opts.pp,
        cp=opts.cp,
        dtype=opts.dtype,
        tag="parallel",
        init_dir=work / "init" if reference_dir is not None else None,
    )
    destroy()
    if rank != 0:
        return 0
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *(argv if argv is not None else sys.argv[1:]),
        "--single-process",
        "--work-dir",
        str(work),
    ]
    try:
        proc = subprocess.run(
            cmd, env=_single_process_env(), check=False, timeout=args.single_process_timeout
        )
    except subprocess.TimeoutExpired:
        print(
            f"check_parallel_equivalence: the single-process run took over {args.single_process_timeout} s",
            file=sys.stderr,
        )
        return 2
    if proc.returncode != 0:
        print(
            f"check_parallel_equivalence: the single-process run failed (exit {proc.returncode})",
            file=sys.stderr,
        )
        return 2
    single = torch.load(work / "single.pt", weights_only=False)
    checks = compare(parallel, single, dtype=opts.dtype)
    device = _device_name()
    slug = device.split()[-1].lower() if cuda else "cpu"
    out = Path(
        args.out or f"benchmarks/results/parallel_equivalence_tp{opts.tp}_pp{opts.pp}_cp{opts.cp}_{slug}.json"
    )
    report = {
        "device": device,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "world_size": world,
        "layout": {
            "tp": opts.tp,
            "pp": opts.pp,
            "cp": opts.cp,
            "dp": world // model_parallel,
            "sequence_parallel": opts.tp > 1,
            "distributed_optimizer": "run 2",
            "optimizer_checkpoint_format": "fully_reshardable",
        },
        "options": dataclasses.asdict(opts),
        "tolerances": {
            "fp32_loss_rtol": FP32_LOSS_RTOL,
            "fp32_tensor_rtol": FP32_TENSOR_RTOL,
            "bf16_rule": "|par - gold| <= 3 |single_bf16 - gold| + 2^-8 (relative)",
        },
        "losses": {
            "parallel": parallel["losses"],
            "single": single["reference"][opts.dtype]["losses"],
            "resumed": single["resume"]["losses"],
        },
        "ok": all(c["ok"] for c in checks),
        "num_checks": len(checks),
        "checks": checks,
    }
    write_json_atomic(out, report)
    _print_report(
        checks,
        header=f"TP{opts.tp} x PP{opts.pp} x CP{opts.cp} x DP{world // model_parallel} vs one "
        f"process, {opts.dtype}, {device}",
    )
    print(f"wrote {out}")
    if made_work and not args.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    elif made_work:
        print(f"kept {work} (reuse with --reference-dir {work})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
