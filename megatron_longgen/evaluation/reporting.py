"""Writing eval results: JSON (atomically: temp file + rename) and PNG plots (matplotlib, optional).

Plots need matplotlib (`pip install matplotlib`); without it the tools still write their JSON and say
how to get the plots.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from megatron_longgen.utils.optional import require


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented JSON at `path`, never leaving a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def can_plot() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    require("matplotlib", feature="eval plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    os.replace(tmp, path)


def heatmap_png(path: str | Path, grid: Mapping[int, Mapping[float, float]], *, title: str) -> None:
    """Accuracy heat map: context length on x, needle depth on y (0% top), cell text = accuracy."""
    plt = _pyplot()
    lengths = sorted(grid)
    depths = sorted({d for row in grid.values() for d in row})
    values = [[grid[length].get(depth, float("nan")) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for y, row in enumerate(values):
        for x, value in enumerate(row):
            if not math.isnan(value):
                ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    _save(fig, Path(path))
    plt.close(fig)


def curves_png(
    path: str | Path,
    series: Mapping[str, tuple[list[float], list[float]]],
    *,
    title: str,
    ylabel: str,
    logy=True,
) -> None:
    """Line plot of named (x, y) series; x = token position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("token position")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, Path(path))
    plt.close(fig)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
