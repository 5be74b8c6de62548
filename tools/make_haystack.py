"""Build the natural-text haystack for needle-in-a-haystack evaluation from GNU info manuals.

    python tools/make_haystack.py [--info-dir /usr/share/info] [--chars 1200000]

Writes `megatron_longgen/assets/haystack_gnu_manuals.txt.xz` (prose paragraphs, ASCII, ~300K tokens of
Llama-2 tokenizer text; about 0.3 MB compressed) and `haystack_gnu_manuals.NOTICE` (sources, their
copyright lines and licence). The asset is committed: GPU machines need not have these manuals.

Why these texts: the haystack must be natural prose that the project's training data does not contain.
The shipped tiny corpus is synthetic stories; the SmolLM2 example trains on Python packages' sources,
docs and licence texts. GNU manuals (coreutils, gettext, sed, grep, diffutils, wget, find, ...) are
neither, and every Debian image has them. Licence sections, menus, indices, code examples and tables
are dropped; only paragraphs of running text are kept, reflowed to one line each, in manual order.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import re
import sys
import tempfile
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "megatron_longgen" / "assets"
ASSET = "haystack_gnu_manuals.txt.xz"
NOTICE = "haystack_gnu_manuals.NOTICE"
# Manual order is part of the asset's definition (prose-rich manuals first).
MANUALS = (
    "coreutils", "gettext", "sed", "grep", "diffutils", "wget", "find", "gzip", "ed", "time", "rluserman",
    "libtasn1", "gnupg", "nettle",
)  # fmt: skip
SKIP_NODES = re.compile(
    r"(licen[cs]e|copying|\bgpl\b|\blgpl\b|\bfdl\b|public license|index|^top$|history|tag table|indirect|acknowledg|thanks)",
    re.IGNORECASE,
)
# Copyright lines of the licence templates quoted inside manuals ("Copyright (C) YEAR YOUR NAME").
TEMPLATE_NAMES = re.compile(r"(YEAR|YOUR NAME|NAME OF AUTHOR|FOO BAR|YYYY)")
GFDL = "GNU Free Documentation License"
ASCII = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "-",
    "\u2026": "...",
}


def manual_files(info_dir: Path, name: str) -> list[Path]:
    """The info file(s) of a manual: split manuals (`find.info-1.gz`, ...) in order, else `name.info.gz`."""
    parts = sorted(
        info_dir.glob(f"{name}.info-*.gz"), key=lambda p: int(re.findall(r"-(\d+)\.gz$", p.name)[0])
    )
    if parts:
        return parts
    single = info_dir / f"{name}.info.gz"
    return [single] if single.exists() else []


def is_prose(paragraph: str, raw_lines: list[str]) -> bool:
    if len(paragraph) < 160 or paragraph.count(". ") + paragraph.endswith(".") < 2:
        return False
    # Menus, lists, code examples and tables; option descriptions are indented by exactly 5 spaces.
    if any(line.startswith(("*", "-", "\t", "      ")) for line in raw_lines):
        return False
    if re.search(r"(copyright|licen[cs]e|free software foundation|warranty)", paragraph, re.IGNORECASE):
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return letters / len(paragraph) > 0.85


def to_ascii(text: str) -> str:
    for old, new in ASCII.items():
        text = text.replace(old, new)
    return text.encode("ascii", "ignore").decode("ascii")


def read_gz(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def manual_paragraphs(path: Path) -> tuple[list[str], list[str]]:
    """(prose paragraphs, copyright lines) of one info file."""
    text = read_gz(path)
    copyright_lines = sorted(
        {
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith("Copyright") and not TEMPLATE_NAMES.search(line)
        }
    )
    paragraphs = []
    for node in text.split("\x1f")[1:]:
        header, _, body = node.lstrip("\n").partition("\n")
        match = re.search(r"Node: ([^,\n]+)", header)
        if match is None or SKIP_NODES.search(match.group(1)):
            continue
        for block in re.split(r"\n\s*\n", body):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or re.fullmatch(r"[=*\-.]+", lines[-1].strip()):
                continue  # headings are underlined
            # Term lines of a definition list (an option or a name in quotes) are not prose.
            lines = [line for line in lines if not re.fullmatch(r"\s*\u2018.*\u2019\s*", line)]
            paragraph = re.sub(r"\s+", " ", to_ascii(" ".join(line.strip() for line in lines)))
            if is_prose(paragraph, lines):
                paragraphs.append(paragraph)
    return paragraphs, copyright_lines


def build(info_dir: Path, max_chars: int) -> tuple[str, list[str]]:
    kept, notice, total = [], [], 0
    for name in MANUALS:
        files = manual_files(info_dir, name)
        # Only manuals published under the GFDL (what the NOTICE states); others are skipped.
        if not files or not any(GFDL in read_gz(p) for p in files):
            continue
        lines = []
        for path in files:
            paragraphs, copyright_lines = manual_paragraphs(path)
            lines += copyright_lines
            for paragraph in paragraphs:
                if total >= max_chars:
                    break
                kept.append(paragraph)
                total += len(paragraph) + 2
        notice.append(
            f"{name} manual ({', '.join(p.name for p in files)}): " + "; ".join(dict.fromkeys(lines))
        )
        if total >= max_chars:
            break
    return "\n\n".join(kept) + "\n", notice


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--info-dir", default="/usr/share/info", help="where the *.info.gz manuals are")
    parser.add_argument("--chars", type=int, default=1_200_000, help="stop after this many characters")
    parser.add_argument("--out-dir", default=str(ASSET_DIR), help="folder for the asset and its NOTICE")
    args = parser.parse_args(argv)
    info_dir, out_dir = Path(args.info_dir), Path(args.out_dir)
    text, notice = build(info_dir, args.chars)
    if len(text) < args.chars // 2:
        print(
            f"make_haystack: error: only {len(text)} characters of prose found under {info_dir}",
            file=sys.stderr,
        )
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    data = lzma.compress(text.encode("ascii"), preset=9 | lzma.PRESET_EXTREME)
    write_atomic(out_dir / ASSET, data)
    header = (
        "Needle-in-a-haystack text: prose paragraphs extracted (reflowed, ASCII) by tools/make_haystack.py\n"
        "from these GNU manuals as installed by Debian. The manuals are distributed under the GNU Free\n"
        "Documentation License (version 1.3 or later; see /usr/share/common-licenses/GFDL-1.3 or\n"
        "https://www.gnu.org/licenses/fdl-1.3.txt), with these copyright notices:\n\n"
    )
    write_atomic(out_dir / NOTICE, (header + "\n".join(notice) + "\n").encode("utf-8"))
    print(
        f"wrote {out_dir / ASSET}: {len(text)} characters, {len(data)} bytes compressed, {len(notice)} manuals"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
