"""One launch validator for the trainer's start-up, `DRY_RUN=1` of the Slurm scripts and `tools/check_launch.py`.

    report = validate_launch(cfg, world_size=64, gpu="h100-80gb")     # raises LaunchError
    print(report.format())

Checks, each failure one line naming the value, the limit and the fix (all of them reported at once):
- sizes: GPUs >= 1; world size = tp * pp * cp * dp; global batch = micro-batch * dp * micro-batches
  (heads vs TP, GQA groups and seq_length vs 2*cp*block_size are checked when the config is built);
- inputs: a production recipe's data blend, tokenizer and initial checkpoint are given (`inputs.py`);
- files (`check_files`): the tokenizer's vocabulary is the model's; the initial checkpoint is a LongGen
  checkpoint of the same shape; every blend prefix is intact, holds one sequence, and the run does not
  repeat it more than `LaunchPolicy.max_data_epochs` times (a warning above one epoch);
- the plan (`gpu` given): the predicted peak memory of the busiest GPU must fit the GPU (a warning within
  `memory_headroom` of the limit; the error names the planner's best layout that fits), and a checkpoint
  save after the current step must finish within the Slurm signal lead time (a warning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_longgen.config import LongGenConfig
from megatron_longgen.launch.gpus import GIB, GpuSpec, get_gpu
from megatron_longgen.launch.layout import Layout, layout_from_config, num_microbatches


class LaunchError(ValueError):
    """A launch that cannot run. `problems`: one line each; `report`: what was learnt before failing."""

    def __init__(self, problems: list[str], *, report: LaunchReport | None = None):
        self.problems = list(problems)
        self.report = report
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, kw_only=True)
class LaunchPolicy:
    """Limits of the checks that are judgement calls."""

    max_data_epochs: float = 4.0
    """Refuse a blend the run would go through more often than this (warn above 1)."""
    signal_lead_s: float = 180.0
    """Seconds between Slurm's USR1 and the time limit (`#SBATCH --signal=B:USR1@N`)."""
    fs_write_gbps: float = 10.0
    """Aggregate file-system write bandwidth available to the job, GB/s (checkpoint save time)."""
    memory_headroom: float = 0.10
    """Warn when the predicted peak uses more than 1 - this share of the usable memory."""
    memory_check: str = "error"
    """What a predicted out-of-memory does: `error`, `warn` or `off`."""

    def __post_init__(self) -> None:
        if self.memory_check not in ("error", "warn", "off"):
            raise ValueError(f"memory_check must be error, warn or off, got {self.memory_check!r}")
        for name in ("max_data_epochs", "signal_lead_s", "fs_write_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class LaunchReport:
    """What the validator found: `lines` describe the launch, `warnings` need a look but do not stop it."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout: Layout | None = None
    plan: object | None = None
    """The `plan.PlanRow` of the configured layout (None without a GPU spec)."""

    def format(self) -> str:
        return "\n".join(self.lines + [f"warning: {w}" for w in self.warnings])


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} FLOP"


def _sizes(
    cfg: LongGenConfig, *, world_size: int, gpus_per_node: int, lines, warnings, problems
) -> Layout | None:
    from megatron_longgen.launch.memory import padded_vocab

    p, t, m = cfg.parallel, cfg.train, cfg.model
    try:
        layout = layout_from_config(cfg, world_size=world_size)
    except ValueError as exc:
        problems.append(
            f"{exc}: change the number of processes (torchrun --nnodes / --nproc-per-node, sbatch --nodes; "
            "check_launch.py --nodes / --gpus-per-node) or the recipe's parallel sizes"
        )
        return None
    lines += [
        f"recipe {cfg.name}: {m.num_layers} layers, pattern {m.layer_pattern}",
        (
            f"world {world_size} = tp {p.tensor_parallel} x pp {p.pipeline_parallel} x cp {p.context_parallel} x dp "
            f"{layout.dp}"
        ),
    ]
    try:
        micro = num_microbatches(cfg, layout)
    except ValueError as exc:
        problems.append(f"{exc}: pick a global_batch_size that divides, or another layout")
        return None
    lines += [
        (
            f"global batch {t.global_batch_size} x {t.seq_length} tokens = {t.global_batch_size * t.seq_length:,} "
            f"tokens/step; {micro} micro-batches of {t.micro_batch_size} per DP rank"
        ),
        f"vocab {m.vocab_size} padded to {padded_vocab(m, tp=p.tensor_parallel)}",
    ]
    if p.tensor_parallel > gpus_per_node:
        warnings.append(
            f"tensor_parallel {p.tensor_parallel} > {gpus_per_node} GPUs per node: TP traffic "
            f"crosses nodes (slow); keep TP within a node"
        )
    return layout


def _pipeline_and_flops(cfg: LongGenConfig, layout: Layout, lines) -> None:
    from megatron_longgen.launch.layout import stage_layer_kinds
    from megatron_longgen.training.flops import training_flops_per_step

    if layout.pp > 1:
        for stage, kinds in enumerate(stage_layer_kinds(cfg, layout)):
            lines.append(f"pipeline stage {stage}: {len(kinds)} layers '{kinds}'")
    executed = training_flops_per_step(cfg)
    dense = training_flops_per_step(cfg, dense_equivalent=True)
    lines.append(
        f"training FLOPs/step: {_flops(executed)} executed, {_flops(dense)} dense-equivalent "
        f"({dense / executed:.2f}x)"
    )


def _files(cfg: LongGenConfig, policy: LaunchPolicy, lines, warnings, problems) -> None:
    from megatron_longgen.launch.inputs import (
        blend_stats,
        check_blend_tokenizer,
        check_init_checkpoint,
        check_tokenizer,
    )

    vocab, tok_problems = check_tokenizer(cfg)
    problems += tok_problems
    if vocab and not tok_problems:
        lines.append(f"tokenizer {cfg.data.tokenizer}: {vocab} tokens (= model.vocab_size)")
    ckpt_problems = check_init_checkpoint(cfg)
    problems += ckpt_problems
    if cfg.train.init_checkpoint and not ckpt_problems:
        lines.append(f"init checkpoint {cfg.train.init_checkpoint}: shape matches the run")
    t = cfg.train
    if not cfg.data.blend.strip():
        corpus = cfg.data.corpus
        if not corpus.startswith("builtin:") and not os.path.isfile(corpus):
            problems.append(f"corpus {corpus} does not exist: pass --data-blend or fix data.corpus")
        return
    stats, blend_problems = blend_stats(cfg)
    problems += blend_problems
    if vocab:
        problems += check_blend_tokenizer(cfg, vocab_size=vocab)
    needed = t.max_steps * t.global_batch_size * t.seq_length
    for s in stats:
        lines.append(
            f"data {s.prefix}: {s.num_tokens:,} tokens ({s.train_tokens:,} train), weight {s.weight:.3f}, "
            f"{s.samples_per_epoch:,} sequences/epoch -> {s.epochs:.2f} epochs over the run"
        )
    finite = [s for s in stats if s.samples_per_epoch]
    if finite:
        worst = max(finite, key=lambda s: s.epochs)
        what = (
            f"the run needs max_steps {t.max_steps} x global_batch_size {t.global_batch_size} x seq_length "
            f"{t.seq_length} = {needed:,} tokens; {worst.prefix} ({worst.train_tokens:,} train tokens, weight "
            f"{worst.weight:.3f}) would be read {worst.epochs:.2f} times"
        )
        if worst.epochs > policy.max_data_epochs:
            problems.append(
                f"{what}, above the limit of {policy.max_data_epochs:g} epochs: add data, lower "
                f"--max-steps, or raise the limit (--max-data-epochs)"
            )
        elif worst.epochs > 1.0:
            warnings.append(f"{what}: the data repeats")


def _plan(cfg, layout, gpu: GpuSpec, *, gpus_per_node, policy: LaunchPolicy, lines, warnings, problems):
    from megatron_longgen.launch.plan import checkpoint_save_estimate, describe_row, evaluate_layout, plan

    row = evaluate_layout(cfg, layout, gpu, gpus_per_node=gpus_per_node, fs_write_gbps=policy.fs_write_gbps)
    lines.append(f"plan on {gpu.description}:")
    lines += ["  " + line for line in describe_row(row)]
    peak, usable = row.peak_bytes, row.usable_bytes
    if peak > usable and policy.memory_check != "off":
        fitting = [
            r
            for r in plan(
                cfg,
                world_size=layout.world_size,
                gpu=gpu,
                gpus_per_node=gpus_per_node,
                fs_write_gbps=policy.fs_write_gbps,
            )
            if r.fits
        ]
        hint = (
            f"the planner's best layout that fits is {fitting[0].layout.describe()} "
            f"({fitting[0].peak_bytes / GIB:.1f} GiB)"
            if fitting
            else "no layout fits on this many GPUs"
        )
        msg = (
            f"predicted peak memory {peak / GIB:.1f} GiB (pipeline rank {row.memory.peak.stage}) exceeds the "
            f"{usable / GIB:.1f} GiB usable on a {gpu.description}: {hint} "
            f"(python tools/plan_parallelism.py --recipe {cfg.name} --gpus {layout.world_size} --gpu {gpu.name}; "
            f"to try anyway: LONGGEN_MEMORY_CHECK=warn, or --memory-check warn for tools/check_launch.py)"
        )
        (problems if policy.memory_check == "error" else warnings).append(msg)
    elif peak > (1 - policy.memory_headroom) * usable and policy.memory_check != "off":
        warnings.append(
            f"predicted peak memory {peak / GIB:.1f} GiB uses {peak / usable:.0%} of the {usable / GIB:.1f} "
            f"GiB usable: little room for fragmentation or a larger kernel workspace"
        )
    ckpt = checkpoint_save_estimate(cfg, layout, fs_write_gbps=policy.fs_write_gbps)
    needed = row.step.total + ckpt.save_s
    lines.append(
        f"checkpoint: {ckpt.total_bytes / 1e9:.0f} GB ({ckpt.busiest_gpu_bytes / 1e9:.1f} GB from the busiest "
        f"GPU), ~{ckpt.save_s:.0f} s at {policy.fs_write_gbps:g} GB/s aggregate"
    )
    if needed > policy.signal_lead_s:
        warnings.append(
            f"after Slurm's signal the trainer finishes its step (~{row.step.total:.0f} s) and saves (~{ckpt.save_s:.0f} s "
            f"for {ckpt.total_bytes / 1e9:.0f} GB at {policy.fs_write_gbps:g} GB/s): ~{needed:.0f} s, more than the "
            f"signal lead time of {policy.signal_lead_s:g} s; raise the lead time, save asynchronously or use a "
            f"faster file system"
        )
    return row


def validate_launch(
    cfg: LongGenConfig,
    *,
    world_size: int,
    gpu: GpuSpec | str | None = None,
    gpus_per_node: int = 8,
    check_files: bool = True,
    policy: LaunchPolicy | None = None,
) -> LaunchReport:
    """Check that `cfg` can run on `world_size` GPUs (module docstring); returns the report, or raises
    `LaunchError` listing every problem found. `gpu` (a `GpuSpec` or a `--gpu` name) enables the memory and
    time plan; `check_files=False` skips reading the tokenizer, the blend and the initial checkpoint."""
    from megatron_longgen.launch.inputs import missing_inputs

    policy = policy or LaunchPolicy()
    lines: list[str] = []
    warnings: list[str] = []
    problems: list[str] = []
    if world_size < 1 or gpus_per_node < 1:
        raise LaunchError(
            [
                (
                    f"world size {world_size} with {gpus_per_node} GPUs per node: need at least one GPU "
                    f"(--nodes >= 1 and --gpus-per-node >= 1)"
                )
            ]
        )
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    layout = _sizes(
        cfg,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        lines=lines,
        warnings=warnings,
        problems=problems,
    )
    if layout is not None:
        _pipeline_and_flops(cfg, layout, lines)
    missing = missing_inputs(cfg)
    problems += missing
    if check_files and not missing:
        _files(cfg, policy, lines, warnings, problems)
    row = None
    if spec is not None and layout is not None:
        row = _plan(
            cfg,
            layout,
            spec,
            gpus_per_node=gpus_per_node,
            policy=policy,
            lines=lines,
            warnings=warnings,
            problems=problems,
        )
    report = LaunchReport(lines=lines, warnings=warnings, layout=layout, plan=row)
    if problems:
        raise LaunchError(problems, report=report)
    return report


def _env_number(environ, name: str, default: float) -> float:
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return float(text)
    except ValueError:
        raise LaunchError([f"{name} must be a number, got {text!r}"]) from None


def policy_from_env(environ=None) -> LaunchPolicy:
    """`LaunchPolicy` from LONGGEN_SIGNAL_LEAD_S, LONGGEN_FS_WRITE_GBPS, LONGGEN_MAX_DATA_EPOCHS and
    LONGGEN_MEMORY_CHECK (error | warn | off); unset variables keep the defaults."""
    env = os.environ if environ is None else environ
    defaults = LaunchPolicy()
    try:
        return LaunchPolicy(
            signal_lead_s=_env_number(env, "LONGGEN_SIGNAL_LEAD_S", defaults.signal_lead_s),
            fs_write_gbps=_env_number(env, "LONGGEN_FS_WRITE_GBPS", defaults.fs_write_gbps),
            max_data_epochs=_env_number(env, "LONGGEN_MAX_DATA_EPOCHS", defaults.max_data_epochs),
            memory_check=env.get("LONGGEN_MEMORY_CHECK", defaults.memory_check).strip().lower(),
        )
    except ValueError as exc:
        raise LaunchError([f"launch policy from the environment: {exc}"]) from None


def job_size_from_env(environ=None) -> tuple[int, int]:
    """(world size, GPUs per node) of this job from torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE or Slurm's
    SLURM_NTASKS / SLURM_NTASKS_PER_NODE (e.g. "8" or "8(x4)"); (1, 1) for a plain process."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    per_node = env.get("LOCAL_WORLD_SIZE") or (env.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
    return world, int(per_node) if per_node else min(world, 8)


def validate_launch_from_env(cfg: LongGenConfig, *, check_files: bool = True, environ=None) -> LaunchReport:
    """`validate_launch` for the job this process belongs to, as the trainer calls it at start-up: sizes from
    `job_size_from_env`, the GPU from this process's CUDA device (`gpus.detect_gpu`; no plan on CPU or an
    unknown GPU), the policy from `policy_from_env`."""
    from megatron_longgen.launch.gpus import detect_gpu

    world, per_node = job_size_from_env(environ)
    return validate_launch(
        cfg,
        world_size=world,
        gpu=detect_gpu(),
        gpus_per_node=per_node,
        check_files=check_files,
        policy=policy_from_env(environ),
    )
