"""Step 2: long training documents that exist offline on any machine -> a Megatron indexed dataset.

    python examples/smollm2_32k/build_data.py --target-tokens 20000000 --workers 16
    # -> runs/smollm2_32k/data/train.{bin,idx,stats.json}, heldout.jsonl, build_stats.json

Sources (natural text, read from the Python installation that runs this script, so a laptop and a GPU node
produce the same *kind* of data from whatever they have installed):
- `code`: the `.py` files of site-packages and the standard library, one document per directory (its
  files in name order, each under a `# file: <path>` line), split at file boundaries above
  `--max-doc-chars`: long, repository-like documents with real long-range structure (imports, classes and
  their uses far apart). Generated or minified files are skipped (over 2 MB, lines over 5,000 characters,
  mean line over 200, not UTF-8).
- `docs`: the `.md` / `.rst` / `.txt` files of each top-level package and the `METADATA` of each installed
  distribution (README-style long descriptions), concatenated per package; all of them (they are small).
- `licenses`: `/usr/share/common-licenses` and the licence files of installed distributions, de-duplicated
  by content, concatenated into long documents.
- `synthetic`: record-lookup documents (`retrieval_docs.py`) with haystacks cut from the documents above,
  `--synthetic-fraction` of the tokens (at most 0.25).
Never used: Debian manuals and /usr/share/doc (the evaluation's haystack), the evaluation's needle phrasings.

Held out: `--heldout-docs` long `code` documents (>= `--heldout-min-chars`), chosen by a hash of their
path, never trained on, written to `heldout.jsonl` for perplexity by position.

Amount: code directories are drawn at random (seeded) until about `--oversample` x the natural share of
`--target-tokens` is chosen (and read by `--workers` processes), so the run time follows the target, not
the installation's size. Then
`tools/preprocess_data.py` tokenizes (SmolLM2's tokenizer, `<bos>` at document starts) and up-samples
long documents per source the Fu et al. way (`--long-threshold 8192`: documents beyond the original 8K
context weigh `--long-weight` times more, each source keeping its token share) to `--target-tokens`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import time
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from retrieval_docs import retrieval_documents

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # megatron_longgen without an install
CODE_SUFFIXES = (".py",)
DOC_SUFFIXES = (".md", ".rst", ".txt")
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
SKIP_DIRS = ("__pycache__", "site-packages", "dist-packages")
LICENSE_DOC_CHARS = 160_000  # ~40K tokens: several licence documents, so length sampling keeps some
MAX_FILE_BYTES = 2_000_000
HIST_BINS = (0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def default_roots() -> list[Path]:
    """site-packages (pure and platform) and the standard library of the running interpreter."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("purelib", "platlib", "stdlib"):
        path = Path(paths[key]).resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def read_text(path: Path) -> str | None:
    """The file's text, or None for generated, minified, binary or non-UTF-8 files."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    if not text.strip() or max(map(len, lines)) > 5000 or len(text) / len(lines) > 200:
        return None
    return text


Candidate = tuple[str, list[Path], Path]
"""(name, files, root): one document (or several, when long) of a source."""


def size_chunks(files: list[Path], *, max_bytes: int) -> list[list[Path]]:
    """`files` in order, cut into runs of at most `max_bytes` (by file size; a larger file is a run alone)."""
    chunks: list[list[Path]] = [[]]
    used = 0
    for path in files:
        size = path.stat().st_size
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(path)
        used += size
    return chunks


def scan(roots: list[Path], *, max_doc_chars: int) -> tuple[list[Candidate], list[Candidate], list[Path]]:
    """(code candidates, docs candidates, licence files) under `roots`, in sorted order. A directory's `.py`
    files are cut into candidates of at most `max_doc_chars` bytes (so the amount read tracks the budget
    closely); they share the directory's name, `<root name>/<path below root>`, which is the same on every
    machine with the same packages."""
    code: list[Candidate] = []
    docs: dict[tuple[str, Path], list[Path]] = {}
    licenses: list[Path] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # Nested site-packages (the stdlib folder of some installs holds one) would duplicate packages.
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            here = Path(dirpath)
            rel = here.relative_to(root)
            top = rel.parts[0] if rel.parts else ""
            files = sorted(filenames)
            py = [here / f for f in files if f.endswith(CODE_SUFFIXES)]
            if py:
                code.extend(
                    (f"{root.name}/{rel}", chunk, root) for chunk in size_chunks(py, max_bytes=max_doc_chars)
                )
            if top.endswith((".dist-info", ".egg-info")):
                docs.setdefault((top.split("-")[0], root), []).extend(
                    here / f for f in files if f == "METADATA"
                )
                licenses.extend(
                    here / f
                    for f in files
                    if f.upper().startswith(LICENSE_PREFIXES) or here.name == "licenses"
                )
            elif top:
                docs.setdefault((top, root), []).extend(
                    here / f
                    for f in files
                    if f.endswith(DOC_SUFFIXES) and not f.upper().startswith(LICENSE_PREFIXES)
                )
    doc_candidates = [
        (f"{root.name}/{top}", files, root) for (top, root), files in sorted(docs.items()) if files
    ]
    return code, doc_candidates, licenses


def join_files(candidate: Candidate, *, max_chars: int) -> list[str]:
    """The readable files of one candidate as documents of at most `max_chars` (split at file boundaries)."""
    _, files, root = candidate
    out, parts, size = [], [], 0
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        piece = f"# file: {path.relative_to(root)}\n{text.rstrip()}\n"
        if parts and size + len(piece) > max_chars:
            out.append("\n".join(parts))
            parts, size = [], 0
        parts.append(piece[:max_chars])
        size += len(piece)
    if parts:
        out.append("\n".join(parts))
    return out


def license_documents(files: list[Path], *, max_chars: int) -> list[str]:
    """Unique licence texts (by content) concatenated into documents of at most `max_chars`."""
    seen: set[str] = set()
    out, parts, size = [], [], 0
    for path in files:
        text = read_text(path) if path.is_file() else None
        if text is None:
            continue
        digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        piece = f"License text ({path.name}):\n\n{text.strip()}\n"
        if parts and size + len(piece) > max_chars:
            out.append("\n".join(parts))
            parts, size = [], 0
        parts.append(piece[:max_chars])
        size += len(piece)
    if parts:
        out.append("\n".join(parts))
    return out


def chars_per_token(tokenizer: str, samples: list[str], *, slice_chars: int = 20_000) -> float:
    """Characters per token of `samples` (a slice of each of up to 40 of them, so no single document
    dominates); 4.0 when there is no text."""
    from megatron_longgen.data.tokenizers import load_tokenizer

    text = "\n".join(s[:slice_chars] for s in samples[:40])
    return len(text) / len(load_tokenizer(tokenizer).encode(text)) if text.strip() else 4.0


def histogram(lengths: np.ndarray) -> dict:
    edges = np.asarray(HIST_BINS + (np.iinfo(np.int64).max,))
    which = np.searchsorted(edges, lengths, side="right") - 1
    labels = [f"{lo}-{hi}" for lo, hi in itertools.pairwise(HIST_BINS)] + [f">={HIST_BINS[-1]}"]
    return {
        "bins_tokens": labels,
        "documents": np.bincount(which, minlength=len(labels)).tolist(),
        "tokens": np.bincount(which, weights=lengths, minlength=len(labels)).astype(np.int64).tolist(),
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written to a temporary name and renamed."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "smollm2_32k", help="writes WORKDIR/data/")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default WORKDIR/hf/original)")
    p.add_argument("--target-tokens", type=int, default=20_000_000, help="tokens in the training dataset")
    p.add_argument("--synthetic-fraction", type=float, default=0.15, help="token share of retrieval docs")
    p.add_argument(
        "--synthetic-doc-chars",
        type=int,
        nargs="+",
        default=[16_000, 32_000, 64_000, 128_000],
        help="lengths of retrieval documents, drawn uniformly (default: ~4K-35K tokens)",
    )
    p.add_argument("--oversample", type=float, default=1.5, help="natural tokens read / natural tokens kept")
    p.add_argument("--max-doc-chars", type=int, default=600_000, help="longest document (~140K tokens)")
    p.add_argument("--heldout-docs", type=int, default=8, help="long documents held out for perplexity")
    p.add_argument("--heldout-min-chars", type=int, default=320_000, help="~75K tokens: enough for 64K")
    p.add_argument("--long-threshold", type=int, default=8192, help="tokens from which a document is long")
    p.add_argument("--long-weight", type=float, default=4.0, help="relative weight of long documents")
    p.add_argument("--roots", type=Path, nargs="+", default=None, help="default: site-packages + stdlib")
    p.add_argument("--licenses-dir", type=Path, default=Path("/usr/share/common-licenses"))
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if not 0.0 <= args.synthetic_fraction <= 0.25:
        p.error(f"--synthetic-fraction must be in [0, 0.25], got {args.synthetic_fraction}")
    return args


def select_heldout(code: list[Candidate], *, count: int, min_chars: int, max_chars: int) -> list[dict]:
    """`count` long code documents from distinct directories, never trained on (nor is any other file of
    their directories): the first directories in the order of a hash of their name (so the choice does not
    depend on the seed or on what else is installed) that give one."""
    heldout: list[dict] = []
    for candidate in sorted(code, key=lambda c: hashlib.sha1(c[0].encode()).hexdigest()):
        if len(heldout) == count:
            break
        if candidate[0] in {d["name"] for d in heldout}:
            continue  # one document per directory: held-out texts from different packages
        if sum(f.stat().st_size for f in candidate[1]) >= min_chars:
            docs = [d for d in join_files(candidate, max_chars=max_chars) if len(d) >= min_chars]
            if docs:
                heldout.append({"text": docs[0], "source": "code", "name": candidate[0]})
    return heldout


def read_natural(
    code: list[Candidate],
    doc_candidates: list[Candidate],
    license_files: list[Path],
    *,
    args: argparse.Namespace,
    tokenizer: str,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """({source: documents}, characters per token of code and of prose). Licences and package documentation (the prose; small)
    in full, then code directories in a seeded random order until the character budget, judged by file
    sizes, is reached; the chosen directories are read by `args.workers` processes."""
    natural: dict[str, list[str]] = {"code": [], "docs": [], "licenses": []}
    natural["licenses"] = license_documents(license_files, max_chars=LICENSE_DOC_CHARS)
    for candidate in doc_candidates:
        natural["docs"].extend(join_files(candidate, max_chars=args.max_doc_chars))
    prose = natural["licenses"] + natural["docs"]
    pool = list(code)
    random.Random(args.seed).shuffle(pool)
    probe = [d for c in pool[:20] for d in join_files(c, max_chars=args.max_doc_chars)]
    cpt = {"code": chars_per_token(tokenizer, probe), "prose": chars_per_token(tokenizer, prose)}
    prose_tokens = sum(map(len, prose)) / cpt["prose"]
    code_tokens = args.target_tokens * (1 - args.synthetic_fraction) * args.oversample - prose_tokens
    budget_chars = sum(map(len, prose)) + int(max(code_tokens, 0) * cpt["code"])
    chosen, planned = [], sum(map(len, prose))
    for candidate in pool:
        if planned >= budget_chars:
            break
        chosen.append(candidate)
        planned += sum(f.stat().st_size for f in candidate[1])
    with get_context("spawn").Pool(args.workers) as workers:
        for docs in workers.imap(partial(join_files, max_chars=args.max_doc_chars), chosen, chunksize=4):
            natural["code"].extend(docs)
    return natural, cpt


def tokenize(inputs: list[str], *, prefix: Path, tokenizer: str, args: argparse.Namespace) -> float:
    """tools/preprocess_data.py: tokens with <bos> per document, long documents up-sampled per source, to
    `args.target_tokens`. Returns the CPU seconds of the tool and its workers."""
    cmd = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        *inputs,
        "--tokenizer",
        tokenizer,
        "--output-prefix",
        str(prefix),
        "--workers",
        str(args.workers),
        "--long-threshold",
        str(args.long_threshold),
        "--long-weight",
        str(args.long_weight),
        "--target-tokens",
        str(args.target_tokens),
        "--seed",
        str(args.seed),
        "--no-progress",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tool and its (joined) workers
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    tokenizer = args.tokenizer or str(args.workdir / "hf" / "original")
    out = args.workdir / "data"
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    roots = [r.resolve() for r in (args.roots or default_roots())]
    code, doc_candidates, license_files = scan(roots, max_doc_chars=args.max_doc_chars)
    if args.licenses_dir.is_dir():
        license_files = sorted(p for p in args.licenses_dir.iterdir() if p.is_file()) + license_files
    if not code:
        raise SystemExit(f"build_data: no .py files under {[str(r) for r in roots]}")
    lap("scan_s")
    heldout = select_heldout(
        code, count=args.heldout_docs, min_chars=args.heldout_min_chars, max_chars=args.max_doc_chars
    )
    held = {d["name"] for d in heldout}
    natural, cpt = read_natural(
        [c for c in code if c[0] not in held], doc_candidates, license_files, args=args, tokenizer=tokenizer
    )
    lap("read_s")

    # Synthetic retrieval documents: their token share is set from their own measured characters per token.
    natural_docs = [d for docs in natural.values() for d in docs]
    synthetic, num_records, synth_cpt = [], 0, None
    if args.synthetic_fraction > 0:
        probe, _ = retrieval_documents(natural_docs, total_chars=200_000, doc_chars=(20_000,), seed=args.seed)
        synth_cpt = chars_per_token(tokenizer, probe)
        natural_tokens = (
            sum(map(len, natural["code"])) / cpt["code"]
            + sum(len(d) for d in natural["docs"] + natural["licenses"]) / cpt["prose"]
        )
        want_tokens = natural_tokens * args.synthetic_fraction / (1 - args.synthetic_fraction)
        synthetic, num_records = retrieval_documents(
            natural_docs,
            total_chars=int(want_tokens * synth_cpt),
            doc_chars=tuple(args.synthetic_doc_chars),
            seed=args.seed + 1,
        )
    sources = {**natural, "synthetic": synthetic}
    inputs = []
    for source, docs in sources.items():
        if docs:
            write_jsonl(out / "corpus" / f"{source}.jsonl", [{"text": d} for d in docs])
            inputs.append(str(out / "corpus" / f"{source}.jsonl"))
    write_jsonl(out / "heldout.jsonl", heldout)
    lap("synthetic_and_write_s")
    prefix = out / "train"
    timings["tokenize_cpu_s"] = tokenize(inputs, prefix=prefix, tokenizer=tokenizer, args=args)
    lap("tokenize_s")
    timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s") and not k.endswith("cpu_s"))
    timings["main_process_cpu_s"] = time.process_time()

    from megatron_longgen.data.indexed import read_document_lengths

    pre = json.loads(Path(f"{prefix}.stats.json").read_text())
    keys = (
        "documents_in",
        "tokens_in",
        "documents_out",
        "tokens_out",
        "share_out",
        "long_token_fraction_out",
    )
    per_source = {name.removesuffix(".jsonl"): {k: s[k] for k in keys} for name, s in pre["sources"].items()}
    stats = {
        "roots": [str(r) for r in roots],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "roots"},
        "tokenizer": tokenizer,
        "documents_in": {s: len(d) for s, d in sources.items()},
        "chars_in": {s: sum(map(len, d)) for s, d in sources.items()},
        "chars_per_token": {**cpt, "synthetic": synth_cpt},
        "synthetic_records": num_records,
        "tokens_per_source": per_source,
        "tokens_out": pre["tokens_out"],
        "documents_out": pre["documents_out"],
        "length_histogram_out": histogram(read_document_lengths(str(prefix)).astype(np.int64)),
        "heldout": [{"name": d["name"], "chars": len(d["text"])} for d in heldout],
        "timings_s": timings,
        "cpu_count": os.cpu_count(),
    }
    tmp = out / f"build_stats.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, out / "build_stats.json")
    synthetic_share = per_source.get("synthetic", {}).get("share_out", 0.0)
    if synthetic_share > 0.25:
        raise SystemExit(
            f"build_data: synthetic documents are {synthetic_share:.1%} of the tokens (> 25%); "
            "lower --synthetic-fraction"
        )
    print(
        f"build_data: {pre['tokens_out']:,} tokens in {pre['documents_out']:,} documents ("
        + ", ".join(f"{k} {v['share_out']:.1%}" for k, v in per_source.items())
        + f"); {len(heldout)} held-out documents; {timings['total_s']:.1f} s; stats in {out / 'build_stats.json'}"
    )
    return stats


if __name__ == "__main__":
    main()
