"""The eval command lines (`tools/eval_passkey.py`, `eval_niah.py`, `eval_ppl_by_position.py`): options,
run, table on stdout, JSON + PNG in `--out-dir`. Every JSON records the model, KV policy, layer kinds,
device, date and versions next to the figures."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

from megatron_longgen.evaluation import reporting


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _environment(model) -> dict:
    import torch
    import transformers

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }  # fmt: skip


def _model_info(args, model) -> dict:
    return {"model": str(args.model), "kv_policy": args.kv_policy, "layer_kinds": model.layer_kinds(),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}  # fmt: skip


def _plot(make, path: Path) -> str:
    if not reporting.can_plot():
        return f"(no plot: matplotlib is not installed; `pip install matplotlib` for {path.name})"
    make()
    return f"wrote {path}"


def retrieval_parser(
    *, tool: str, tasks: dict[str, str], default_task: str, default_lengths: str
) -> argparse.ArgumentParser:
    from megatron_longgen.inference.loading import add_model_args

    parser = argparse.ArgumentParser(prog=tool, description=__doc__)
    add_model_args(parser)
    parser.add_argument("--task", default=default_task, choices=tuple(tasks), help="retrieval task")
    parser.add_argument(
        "--lengths", type=_ints, default=_ints(default_lengths), help="context lengths, e.g. 1024,2048"
    )
    parser.add_argument(
        "--depths", type=_floats, default=_floats("0,0.25,0.5,0.75,1"), help="needle depths in [0, 1]"
    )
    parser.add_argument("--samples", type=int, default=2, help="samples per (length, depth)")
    parser.add_argument("--needles", type=int, default=4, help="needles of the multikey / multivalue tasks")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=1, help="samples per generate() call")
    parser.add_argument("--out-dir", default="eval_results")
    parser.add_argument("--name", default=None, help="file stem (default: TASK_KVPOLICY)")
    parser.add_argument("--label", default=None, help="plot title (default: the model folder name)")
    return parser


def run_retrieval(argv: list[str] | None, *, tool: str, tasks: dict[str, str], default_task: str,
                  default_lengths: str) -> int:  # fmt: skip
    """Shared main of eval_passkey / eval_niah: `tasks` maps --task choices to `retrieval.TASKS`."""
    args = retrieval_parser(
        tool=tool, tasks=tasks, default_task=default_task, default_lengths=default_lengths
    ).parse_args(argv)
    from megatron_longgen.evaluation.retrieval import build_samples
    from megatron_longgen.evaluation.runner import generate_answers
    from megatron_longgen.evaluation.scoring import accuracy_table
    from megatron_longgen.inference.loading import load_from_args

    task = tasks[args.task]
    try:
        if args.samples < 1 or not args.lengths or not args.depths:
            raise ValueError("need --samples >= 1 and at least one length and one depth")
        model, tokenizer = load_from_args(args)
        samples = build_samples(tokenizer, task=task, lengths=args.lengths, depths=args.depths,
                                num_samples=args.samples, seed=args.seed, num_needles=args.needles)  # fmt: skip
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        print(f"{tool}: error: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    records = generate_answers(model, tokenizer, samples, batch_size=args.batch_size,
                               progress=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    table = accuracy_table(samples, [r["score"] for r in records])[task]
    name = args.name or f"{args.task}_{args.kv_policy}"
    out_dir = Path(args.out_dir)
    result = {
        "tool": tool, "task": task, **_model_info(args, model), "lengths": args.lengths, "depths": args.depths,
        "samples_per_cell": args.samples, "seed": args.seed, "accuracy": table["by_length_depth"],
        "by_length": table["by_length"], "mean": table["mean"],
        "exact_match_mean": sum(r["exact"] for r in records) / len(records),
        "seconds": time.perf_counter() - start, **_environment(model), "records": records,
    }  # fmt: skip
    reporting.write_json(out_dir / f"{name}.json", result)
    _print_grid(task, table)
    title = f"{task}: {args.label or Path(args.model).name} (kv-policy {args.kv_policy}, layers {model.layer_kinds()})"
    png = out_dir / f"{name}.png"
    print(_plot(lambda: reporting.heatmap_png(png, table["by_length_depth"], title=title), png))
    print(f"wrote {out_dir / f'{name}.json'}; mean accuracy {table['mean']:.3f}")
    return 0


def _print_grid(task: str, table: dict) -> None:
    grid = table["by_length_depth"]
    lengths = sorted(grid)
    depths = sorted({d for row in grid.values() for d in row})
    print(f"{task} accuracy (rows: depth, columns: context length)")
    print("depth  " + " ".join(f"{n:>8}" for n in lengths))
    for d in depths:
        print(f"{d:5.2f}  " + " ".join(f"{grid[n].get(d, float('nan')):8.2f}" for n in lengths))
    print("mean   " + " ".join(f"{table['by_length'][n]:8.2f}" for n in lengths))


def run_perplexity(argv: list[str] | None) -> int:
    """Main of tools/eval_ppl_by_position.py."""
    from megatron_longgen.inference.loading import add_model_args

    parser = argparse.ArgumentParser(prog="eval_ppl_by_position", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--documents", nargs="+", default=["builtin:haystack"],
                        help="text files (one document each), .jsonl files ('text' field), or builtin:haystack "
                             "(the shipped GNU-manual prose, cut into windows)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=4096, help="document length evaluated (tokens)")
    parser.add_argument("--num-docs", type=int, default=4, help="documents evaluated (each >= --max-tokens)")
    parser.add_argument("--bin-size", type=int, default=256, help="positions per point of the curve")
    parser.add_argument("--out-dir", default="eval_results")
    parser.add_argument("--name", default=None, help="file stem (default: ppl_KVPOLICY)")
    parser.add_argument("--label", default=None, help="curve label (default: model folder + kv policy)")
    parser.add_argument(
        "--overlay", nargs="*", default=[], help="earlier JSON results to draw in the same plot"
    )
    args = parser.parse_args(argv)
    from megatron_longgen.evaluation.documents import load_documents
    from megatron_longgen.evaluation.perplexity import nll_by_position
    from megatron_longgen.inference.loading import load_from_args

    try:
        model, tokenizer = load_from_args(args)
        docs = load_documents(args.documents, tokenizer, max_tokens=args.max_tokens, num_docs=args.num_docs)
        overlays = [reporting.read_json(path) for path in args.overlay]
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        print(f"eval_ppl_by_position: error: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    curve = nll_by_position(model, docs, bin_size=args.bin_size)
    label = args.label or f"{Path(args.model).name} ({args.kv_policy})"
    name = args.name or f"ppl_{args.kv_policy}"
    out_dir = Path(args.out_dir)
    result = {"tool": "eval_ppl_by_position", **_model_info(args, model), "label": label,
              "documents": args.documents, "max_tokens": args.max_tokens, "bin_size": args.bin_size, **curve,
              "seconds": time.perf_counter() - start, **_environment(model)}  # fmt: skip
    reporting.write_json(out_dir / f"{name}.json", result)
    print(f"perplexity by position: {label}, {curve['documents']} documents x {args.max_tokens} tokens")
    print("   start      end     ppl")
    for row in curve["bins"]:
        print(f"{row['start']:8d} {row['end']:8d} {row['ppl']:7.2f}")
    series = {
        r.get("label", f"run {i}"): (
            [(b["start"] + b["end"]) / 2 for b in r["bins"]],
            [b["ppl"] for b in r["bins"]],
        )
        for i, r in enumerate([result, *overlays])
    }
    png = out_dir / f"{name}.png"
    print(
        _plot(
            lambda: reporting.curves_png(
                png, series, title="perplexity by token position", ylabel="perplexity"
            ),
            png,
        )
    )
    print(f"wrote {out_dir / f'{name}.json'}; overall ppl {curve['ppl']:.2f}")
    return 0
