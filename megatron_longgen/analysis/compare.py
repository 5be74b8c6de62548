"""LongGen vs full attention, from logged runs: a markdown report and PNG plots.

For each run: tokens, steps, final loss, cumulative wall clock (restarts included) and productive time,
median tokens/s/GPU and executed / dense-equivalent MFU. Between runs: the throughput speedup of each
LongGen run over the baseline (the first all-full run) and the *time to reach a loss*: the first wall-clock
time (and token count) at which a run's smoothed loss falls to a target every run reaches (the highest of
the runs' smoothed final losses), and the speedup in time-to-target. Smoothing is a trailing mean over
~4% of a run's logged points (none for short runs), so it follows the curve without lagging behind it.
Medians skip the first step (warm-up).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from megatron_longgen.analysis.runs import RunRecord


def smooth(values: list[float], *, fraction: float = 0.04) -> list[float]:
    """Trailing mean over the last max(1, fraction * len) values (plain values for short series)."""
    width = max(1, int(len(values) * fraction))
    out, acc = [], 0.0
    for i, value in enumerate(values):
        acc += value
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


@dataclass
class RunSummary:
    name: str
    attention: str
    pattern: str
    steps: int
    tokens: float
    final_loss: float
    final_loss_smoothed: float
    wall_clock_s: float
    productive_s: float
    num_restarts: int
    tokens_per_s_per_gpu: float | None
    mfu: float | None
    mfu_dense_equiv: float | None


def _median_after_first(run: RunRecord, key: str) -> float | None:
    _steps, values = run.series(key)
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def _last(run: RunRecord, key: str, default: float = 0.0) -> float:
    _, values = run.series(key)
    return values[-1] if values else default


def summarize(run: RunRecord) -> RunSummary:
    steps, losses = run.series("loss")
    if not losses:
        raise ValueError(f"{run.source}: no logged loss")
    return RunSummary(
        name=run.name,
        attention=run.attention,
        pattern=run.layer_pattern,
        steps=steps[-1],
        tokens=_last(run, "tokens"),
        final_loss=losses[-1],
        final_loss_smoothed=smooth(losses)[-1],
        wall_clock_s=_last(run, "wall_clock_s", _last(run, "wall_time_s")),
        productive_s=_last(run, "productive_s"),
        num_restarts=int(_last(run, "num_restarts")),
        tokens_per_s_per_gpu=_median_after_first(run, "tokens_per_s_per_gpu"),
        mfu=_median_after_first(run, "mfu"),
        mfu_dense_equiv=_median_after_first(run, "mfu_dense_equiv"),
    )


def time_to_loss(run: RunRecord, target: float) -> tuple[float, float] | None:
    """(wall-clock seconds, tokens) when the run's smoothed loss first reaches `target`, else None."""
    steps, losses = run.series("loss")
    by_step = {int(r["step"]): r for r in run.rows}
    for step, value in zip(steps, smooth(losses)):
        if value <= target:
            row = by_step[step]
            return float(row.get("wall_clock_s", row.get("wall_time_s", float("nan")))), float(
                row.get("tokens", 0)
            )
    return None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(runs: list[RunRecord]) -> tuple[str, dict]:
    """(markdown, numbers) comparing `runs`; the baseline is the first all-full run (else the first run)."""
    if len(runs) < 1:
        raise ValueError("compare needs at least one run")
    summaries = [summarize(r) for r in runs]
    base_i = next((i for i, s in enumerate(summaries) if s.attention == "full"), 0)
    base = summaries[base_i]
    target = max(s.final_loss_smoothed for s in summaries)
    reach = [time_to_loss(r, target) for r in runs]
    lines = [
        "| run | attention | pattern | steps | tokens | final loss | wall clock (h) | productive (h) | restarts "
        "| tokens/s/GPU | MFU (executed) | MFU (dense-equiv.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.name} | {s.attention} | `{s.pattern}` | {s.steps} | {s.tokens:,.0f} | {s.final_loss:.4f} | "
            f"{s.wall_clock_s / 3600:.4f} | {s.productive_s / 3600:.4f} | {s.num_restarts} | "
            f"{_fmt(s.tokens_per_s_per_gpu, ',.0f')} | {_fmt(s.mfu, '.3f')} | {_fmt(s.mfu_dense_equiv, '.3f')} |"
        )
    lines += [
        "",
        f"Time to reach smoothed loss {target:.4f} (the highest smoothed final loss of the runs; "
        f"baseline: {base.name}):",
        "",
        "| run | wall clock (s) | tokens | speedup vs baseline (time) | throughput speedup |",
        "|---|---|---|---|---|",
    ]
    numbers: dict = {"baseline": base.name, "target_loss": target, "runs": {}}
    for i, (s, hit) in enumerate(zip(summaries, reach)):
        base_hit = reach[base_i]
        time_speedup = base_hit[0] / hit[0] if hit and base_hit and hit[0] > 0 else None
        tput = (
            s.tokens_per_s_per_gpu / base.tokens_per_s_per_gpu
            if s.tokens_per_s_per_gpu and base.tokens_per_s_per_gpu
            else None
        )
        lines.append(
            f"| {s.name} | {_fmt(hit[0] if hit else None, '.1f')} | "
            f"{_fmt(hit[1] if hit else None, ',.0f')} | {_fmt(time_speedup, '.2f')}x | {_fmt(tput, '.2f')}x |"
        )
        numbers["runs"][s.name] = {
            **s.__dict__,
            "time_to_target_s": hit[0] if hit else None,
            "tokens_to_target": hit[1] if hit else None,
            "time_speedup": time_speedup,
            "throughput_speedup": tput,
            "baseline": i == base_i,
        }
    return "\n".join(lines) + "\n", numbers


def plot(runs: list[RunRecord], out_dir: Path) -> list[Path]:
    """loss_vs_tokens.png, loss_vs_wallclock.png, throughput.png, mfu.png under `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def xy(run: RunRecord, xkey: str, ykey: str, scale: float = 1.0):
        by_step = {int(r["step"]): r for r in run.rows}
        steps, ys = run.series(ykey)
        xs = [float(by_step[s].get(xkey, s)) * scale for s in steps]
        return xs, ys

    panels = [
        ("loss_vs_tokens.png", "tokens", 1e-6, "tokens (M)", [("loss", True)]),
        (
            "loss_vs_wallclock.png",
            "wall_clock_s",
            1 / 3600,
            "wall clock (h, restarts included)",
            [("loss", True)],
        ),
        ("throughput.png", "step", 1.0, "step", [("tokens_per_s_per_gpu", False)]),
        ("mfu.png", "step", 1.0, "step", [("mfu", False), ("mfu_dense_equiv", False)]),
    ]
    for name, xkey, scale, xlabel, ykeys in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        drawn = 0
        for run in runs:
            for ykey, smoothed in ykeys:
                xs, ys = xy(run, xkey, ykey, scale)
                if not ys:
                    continue
                style = "--" if ykey.endswith("dense_equiv") else "-"
                label = f"{run.name} ({run.attention})" + (f" {ykey}" if len(ykeys) > 1 else "")
                ax.plot(xs, smooth(ys) if smoothed else ys, style, label=label)
                drawn += 1
        ax.set_xlabel(xlabel)
        ax.set_ylabel(", ".join(k for k, _ in ykeys) + (" (smoothed)" if ykeys[0][1] else ""))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:  # e.g. MFU on CPU, where no peak rate is known
            ax.text(
                0.5,
                0.5,
                f"no {', '.join(k for k, _ in ykeys)} logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
