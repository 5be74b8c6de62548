"""Compare training runs (LongGen vs its full-attention baseline): a markdown report and PNG plots.

    python tools/compare_runs.py runs/7b_longgen runs/7b_full --out reports/7b
    python tools/compare_runs.py runs/a/wandb/offline-run-20261201_120000-ab12cd34 runs/b --out reports/ab

Each argument is a run dir (`metrics.jsonl`, written by longgen-train) or a W&B offline run folder. Writes
OUT/report.md (per-run table, time to reach a common loss, speedups vs the baseline = the first all-full
run), OUT/report.json (the same numbers) and OUT/{loss_vs_tokens,loss_vs_wallclock,throughput,mfu}.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run dirs or W&B offline run folders")
    parser.add_argument("--out", required=True, help="output folder for report.md, report.json and the PNGs")
    args = parser.parse_args(argv)
    from megatron_longgen.analysis import plot, read_run, report

    try:
        runs = [read_run(path) for path in args.runs]
        markdown, numbers = report(runs)
    except ValueError as exc:
        print(f"compare_runs: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is None:
        print("compare_runs: matplotlib is not installed: report without plots "
              '(pip install -e ".[plot]" for the PNGs)', file=sys.stderr)  # fmt: skip
        images = []
    else:
        images = plot(runs, out)
    body = (
        "# LongGen vs full attention\n\n"
        + markdown
        + "\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    )
    for name, text in (("report.md", body), ("report.json", json.dumps(numbers, indent=2) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(markdown)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(images)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
