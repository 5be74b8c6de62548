"""Step 6: collect training runs and evaluations into one JSON and the plots.

    python examples/smollm2_32k/compare.py --device h200
    # -> benchmarks/results/smollm2_32k_h200.json and smollm2_32k_h200_{passkey,niah,loss_tokens,
    #    loss_wallclock,ppl_position}.png

Reads only small files, so it runs anywhere the runs' results were copied to (checkpoints not needed):
WORKDIR/train/VARIANT/{metrics.jsonl,config.json,process_time.json}, WORKDIR/eval/MODEL/{passkey,niah,
ppl}.json, WORKDIR/data/build_stats.json, WORKDIR/hf/original/prepare_report.json. Missing pieces are
reported as missing (`"missing"` in the JSON), never filled in.

JSON: `passkey` and `niah`: model -> {context length -> accuracy in [0, 1]} (NIAH: mean over depths and
needles), models `original`, `longgen`, `sparse_only`, `full`, `attnsink_inference`; `passkey_cells` /
`niah_cells`: model -> {length -> {depth -> accuracy}} (the heat maps); `training`: variant -> {tokens,
steps, wall_clock_s (the training loop), tokens_per_s, process_wall_s (start-up and checkpoint included),
seed, final_loss, eval_loss}; `ppl_by_position`; `targets`: the issue's targets, checked.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("longgen", "sparse_only", "full")
MODELS = ("original", "longgen", "sparse_only", "full", "attnsink_inference")
WINDOW_TOKENS = 64 * (32 + 1)  # sink_window: 1 sink block + 32 window blocks of 64 tokens


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def training_summary(run_dir: Path) -> tuple[dict, list[dict]] | None:
    """(summary, metric rows) of one run from its metrics.jsonl, or None when it has none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r and "tokens" in r]
    if not train_rows:
        return None
    last = train_rows[-1]
    config = read_json(run_dir / "config.json") or {}
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    summary = {
        "tokens": int(last["tokens"]),
        "steps": int(last["step"]),
        "wall_clock_s": float(last["wall_clock_s"]),
        "tokens_per_s": float(last["tokens"]) / float(last["wall_clock_s"]),
        "process_wall_s": (read_json(run_dir / "process_time.json") or {}).get("process_wall_s"),
        "seed": config.get("train", {}).get("seed"),
        "layer_pattern": config.get("model", {}).get("layer_pattern"),
        "final_loss": float(last["loss"]),
        "eval_loss": evals[-1] if evals else None,
        "peak_mem_gib": last.get("peak_mem_gib"),
    }
    return summary, train_rows


def cells(report: dict) -> dict[int, dict[float, float]]:
    """{length: {depth: accuracy}} from an eval tool's JSON.

    Accepted shapes (the contract with tools/eval_passkey.py and tools/eval_niah.py): a list of trials
    `{"results": [{"length": L, "depth": D, "correct": bool} | {..., "accuracy": a}, ...]}`, or a table
    `{"accuracy": {"L": {"D": a}}}`. Several trials of one cell are averaged."""
    table: dict[int, dict[float, list[float]]] = {}
    if "results" in report:
        for r in report["results"]:
            value = float(r["accuracy"]) if "accuracy" in r else float(bool(r["correct"]))
            table.setdefault(int(r["length"]), {}).setdefault(float(r["depth"]), []).append(value)
    elif "accuracy" in report:
        for length, row in report["accuracy"].items():
            for depth, value in row.items():
                table.setdefault(int(length), {}).setdefault(float(depth), []).append(float(value))
    else:
        raise ValueError(
            f"unrecognised eval report (keys {sorted(report)}): expected 'results' or 'accuracy'"
        )
    return {n: {d: sum(v) / len(v) for d, v in sorted(row.items())} for n, row in sorted(table.items())}


def by_length(table: dict[int, dict[float, float]]) -> dict[int, float]:
    return {n: sum(row.values()) / len(row) for n, row in table.items()}


def ppl_curve(report: dict) -> dict:
    """{"positions": [bin centres], "ppl": [per bin]} from tools/eval_ppl_by_position.py's JSON, whose
    `bins` are `{"start", "end", "ppl", ...}` (`ppl` at the top level is the whole-document value)."""
    bins = report["bins"]
    return {
        "positions": [(int(b["start"]) + int(b["end"])) / 2 for b in bins],
        "ppl": [float(b["ppl"]) for b in bins],
    }


def check_targets(passkey: dict, niah: dict, training: dict) -> dict:
    """The issue's targets, each with the numbers it was judged on (None when data is missing)."""
    out: dict = {}
    lg = passkey.get("longgen", {})
    out["longgen_passkey_32k_ge_0.95"] = (lg.get(32768, 0.0) >= 0.95) if 32768 in lg else None
    beyond = [n for n in lg if n > WINDOW_TOKENS]
    rivals = [m for m in ("sparse_only", "attnsink_inference") if m in passkey]
    # "Better at every length beyond the window": strictly, except where both are perfect.
    out["longgen_beats_sparse_and_attnsink_beyond_window"] = (
        all(
            lg[n] > passkey[m].get(n, 0.0) or lg[n] == passkey[m].get(n) == 1.0
            for n in beyond
            for m in rivals
        )
        if beyond and rivals
        else None
    )
    if "longgen" in niah and "full" in niah:
        common = sorted(set(niah["longgen"]) & set(niah["full"]))
        gap = sum(niah["full"][n] - niah["longgen"][n] for n in common) / max(1, len(common))
        out["niah_mean_gap_to_full"] = gap
        out["niah_within_10_points_of_full"] = gap <= 0.10
    if "longgen" in training and "full" in training:
        ratio = training["full"]["wall_clock_s"] / training["longgen"]["wall_clock_s"]
        tokens_equal = training["full"]["tokens"] == training["longgen"]["tokens"]
        out["full_over_longgen_wall_clock"] = ratio
        out["longgen_trains_faster_than_full"] = (ratio > 1.0) if tokens_equal else None
    return out


def save_figure(fig, path: Path) -> None:
    """PNG through a temporary name (never a half-written plot)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def heatmaps(tables: dict[str, dict[int, dict[float, float]]], *, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [m for m in MODELS if m in tables]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        lengths = sorted(tables[name])
        depths = sorted({d for row in tables[name].values() for d in row})
        grid = [[tables[name][n].get(d, float("nan")) for d in depths] for n in lengths]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths], fontsize=7)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("depth", fontsize=8)
    axes[0][0].set_ylabel("context length", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def curves(
    series: dict[str, tuple[list[float], list[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    logy: bool = False,
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "smollm2_32k")
    p.add_argument(
        "--device", default=None, help="name in the output file (default: WORKDIR/device.json or cpu)"
    )
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-plots", action="store_true", help="JSON only (no matplotlib needed)")
    args = p.parse_args(argv)
    w = args.workdir
    device_info = read_json(w / "device.json") or {}
    device = args.device or device_info.get("name", "cpu")
    training, rows, missing = {}, {}, []
    for variant in VARIANTS:
        found = training_summary(w / "train" / variant)
        if found is None:
            missing.append(f"train/{variant}")
            continue
        training[variant], rows[variant] = found
    passkey_cells, niah_cells, ppl = {}, {}, {}
    for model in MODELS:
        for kind, store in (("passkey", passkey_cells), ("niah", niah_cells)):
            report = read_json(w / "eval" / model / f"{kind}.json")
            if report is None:
                missing.append(f"eval/{model}/{kind}")
            else:
                store[model] = cells(report)
        report = read_json(w / "eval" / model / "ppl.json")
        if report is None:
            missing.append(f"eval/{model}/ppl")
        else:
            ppl[model] = ppl_curve(report)
    passkey = {m: by_length(t) for m, t in passkey_cells.items()}
    niah = {m: by_length(t) for m, t in niah_cells.items()}
    import torch

    result = {
        "device": device,
        "device_info": device_info,
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "passkey": passkey,
        "niah": niah,
        "training": training,
        "passkey_cells": passkey_cells,
        "niah_cells": niah_cells,
        "ppl_by_position": ppl,
        "targets": check_targets(passkey, niah, training),
        "data": read_json(w / "data" / "build_stats.json"),
        "model": read_json(w / "hf" / "original" / "prepare_report.json"),
        "missing": missing,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"smollm2_32k_{device}"
    tmp = Path(f"{stem}.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, f"{stem}.json")
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print(
            "compare: matplotlib is not installed: no plots (pip install matplotlib, or pass --no-plots)",
            file=sys.stderr,
        )
    elif not args.no_plots:
        if passkey_cells:
            heatmaps(passkey_cells, title="passkey retrieval accuracy", path=Path(f"{stem}_passkey.png"))
        if niah_cells:
            heatmaps(niah_cells, title="needle in a haystack accuracy", path=Path(f"{stem}_niah.png"))
        if rows:
            curves(
                {v: ([r["tokens"] for r in rs], [r["loss"] for r in rs]) for v, rs in rows.items()},
                xlabel="training tokens",
                ylabel="loss",
                title="loss vs tokens",
                path=Path(f"{stem}_loss_tokens.png"),
            )
            curves(
                {v: ([r["wall_clock_s"] for r in rs], [r["loss"] for r in rs]) for v, rs in rows.items()},
                xlabel="wall-clock (s)",
                ylabel="loss",
                title="loss vs wall-clock",
                path=Path(f"{stem}_loss_wallclock.png"),
            )
        if ppl:
            curves(
                {m: (c["positions"], c["ppl"]) for m, c in ppl.items()},
                xlabel="token position",
                ylabel="perplexity",
                title="perplexity by position (held-out documents)",
                path=Path(f"{stem}_ppl_position.png"),
                logy=True,
            )
    lines = [f"{'variant':<12} {'tokens':>10} {'steps':>6} {'train s':>8} {'tok/s':>9}"]
    lines += [
        f"{v:<12} {t['tokens']:>10,} {t['steps']:>6} {t['wall_clock_s']:>8.1f} {t['tokens_per_s']:>9,.0f}"
        for v, t in training.items()
    ]
    for kind, table in (("passkey", passkey), ("niah", niah)):
        for model, accs in table.items():
            lines.append(
                f"{kind:<8} {model:<20} " + "  ".join(f"{n // 1024}K {a:.2f}" for n, a in accs.items())
            )
    print("\n".join(lines))
    print(f"compare: wrote {stem}.json" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return result


if __name__ == "__main__":
    main()
