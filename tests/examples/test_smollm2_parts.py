"""The pieces of examples/smollm2_32k checked on their own: the synthetic retrieval documents, build_data's
file filters and scan, and compare.py's reading of evaluation reports and its target checks."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2_32k"
sys.path.insert(0, str(EXAMPLE))

import build_data  # noqa: E402  (the example's folder is on sys.path first)
import compare  # noqa: E402
import retrieval_docs  # noqa: E402

HAYSTACK = ["\n".join(f"line {i} of document {d}: some text" for i in range(400)) for d in range(3)]
RECORD_KV = re.compile(
    r"record (\w{6}) -> value (\d+)|registry entry (\w{6}) stores (\d+)\.|\[(\w{6})\] = (\d+)"
    r"|\| (\w{6}) \| (\d+) \|"
)
QUERY = re.compile(r"Lookup: which value does record (\w{6}) hold\? (\d+)")


@pytest.mark.parametrize("seed", range(20))
def test_retrieval_document_answers_are_the_inserted_records(seed):
    doc, num_records = retrieval_docs.retrieval_document(HAYSTACK, num_chars=3000, rng=random.Random(seed))
    body, _, queries = doc.rpartition("\n\n")
    inserted = {}
    for match in RECORD_KV.finditer(body):
        groups = [g for g in match.groups() if g is not None]
        assert groups[0] not in inserted, "record keys must be unique in a document"
        inserted[groups[0]] = groups[1]
    assert len(inserted) == num_records >= 1
    asked = QUERY.findall(queries)
    assert asked and all(inserted[key] == value for key, value in asked)
    assert 5 <= min(len(v) for v in inserted.values()) and max(len(v) for v in inserted.values()) <= 8
    lowered = doc.lower()
    assert "pass key" not in lowered and "magic number" not in lowered  # the evaluation's phrasings


def test_retrieval_records_land_at_many_depths():
    depths = []
    for seed in range(60):
        doc, _ = retrieval_docs.retrieval_document(HAYSTACK, num_chars=6000, rng=random.Random(seed))
        for match in RECORD_KV.finditer(doc):
            depths.append(match.start() / len(doc))
    assert min(depths) < 0.1 and max(depths) > 0.8  # not only near the end, where the queries are


def test_retrieval_documents_total_and_determinism():
    docs, records = retrieval_docs.retrieval_documents(
        HAYSTACK, total_chars=20000, doc_chars=(2000, 4000), seed=3
    )
    again, _ = retrieval_docs.retrieval_documents(HAYSTACK, total_chars=20000, doc_chars=(2000, 4000), seed=3)
    assert docs == again and records >= len(docs)
    assert 20000 <= sum(map(len, docs)) < 20000 + 4000 * 1.5
    with pytest.raises(ValueError, match="haystack"):
        retrieval_docs.retrieval_documents([], total_chars=10, doc_chars=(10,), seed=0)


def test_read_text_skips_generated_and_binary_files(tmp_path):
    good = tmp_path / "a.py"
    good.write_text("def f():\n    return 1\n")
    minified = tmp_path / "b.py"
    minified.write_text("x=" + "1," * 4000 + "\n")
    binary = tmp_path / "c.py"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert build_data.read_text(good) == "def f():\n    return 1\n"
    assert build_data.read_text(minified) is None and build_data.read_text(binary) is None


def test_scan_groups_by_directory_and_skips_nested_site_packages(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("a = 1\n")
    (root / "pkg" / "b.py").write_text("b = 2\n")
    (root / "pkg" / "README.md").write_text("# pkg\nSome prose.\n")
    (root / "pkg" / "sub" / "c.py").write_text("c = 3\n")
    (root / "site-packages" / "other").mkdir(parents=True)
    (root / "site-packages" / "other" / "d.py").write_text("d = 4\n")
    (root / "pkg-1.0.dist-info").mkdir()
    (root / "pkg-1.0.dist-info" / "METADATA").write_text("Name: pkg\n\nA package.\n")
    (root / "pkg-1.0.dist-info" / "LICENSE").write_text("MIT licence text\n")
    code, docs, licenses = build_data.scan([root], max_doc_chars=10_000)
    assert [(name, [f.name for f in files]) for name, files, _ in code] == [
        ("lib/pkg", ["a.py", "b.py"]),
        ("lib/pkg/sub", ["c.py"]),
    ]
    assert [(name, sorted(f.name for f in files)) for name, files, _ in docs] == [
        ("lib/pkg", ["METADATA", "README.md"])
    ]
    assert [f.name for f in licenses] == ["LICENSE"]
    (text,) = build_data.join_files(code[0], max_chars=10_000)
    assert text == "# file: pkg/a.py\na = 1\n\n# file: pkg/b.py\nb = 2\n"
    assert len(build_data.join_files(code[0], max_chars=20)) == 2  # split at the file boundary
    small = build_data.scan([root], max_doc_chars=7)[0]  # each 6-byte file alone: candidates of one name
    assert [(name, [f.name for f in files]) for name, files, _ in small] == [
        ("lib/pkg", ["a.py"]),
        ("lib/pkg", ["b.py"]),
        ("lib/pkg/sub", ["c.py"]),
    ]


def test_compare_reads_both_report_shapes():
    trials = {
        "results": [
            {"length": 4096, "depth": 0.0, "correct": True},
            {"length": 4096, "depth": 0.0, "correct": False},
            {"length": 4096, "depth": 1.0, "correct": True},
            {"length": 8192, "depth": 0.5, "accuracy": 0.25},
        ]
    }
    table = {"accuracy": {"4096": {"0.0": 0.5, "1.0": 1.0}, "8192": {"0.5": 0.25}}}
    expected = {4096: {0.0: 0.5, 1.0: 1.0}, 8192: {0.5: 0.25}}
    assert compare.cells(trials) == expected == compare.cells(table)
    assert compare.by_length(expected) == {4096: 0.75, 8192: 0.25}
    with pytest.raises(ValueError, match="unrecognised eval report"):
        compare.cells({"rows": []})


def test_compare_targets():
    passkey = {
        "longgen": {4096: 1.0, 32768: 0.95},
        "sparse_only": {4096: 1.0, 32768: 0.1},
        "attnsink_inference": {4096: 0.9, 32768: 0.0},
    }
    niah = {"longgen": {4096: 0.9, 32768: 0.8}, "full": {4096: 1.0, 32768: 0.9}}
    training = {
        "longgen": {"wall_clock_s": 80.0, "tokens": 100},
        "full": {"wall_clock_s": 100.0, "tokens": 100},
    }
    t = compare.check_targets(passkey, niah, training)
    assert t["longgen_passkey_32k_ge_0.95"] and t["longgen_beats_sparse_and_attnsink_beyond_window"]
    assert t["niah_mean_gap_to_full"] == pytest.approx(0.1) and t["niah_within_10_points_of_full"]
    assert t["full_over_longgen_wall_clock"] == pytest.approx(1.25) and t["longgen_trains_faster_than_full"]
    passkey["sparse_only"][32768] = 0.95  # a tie beyond the window is not "better"
    training["full"]["tokens"] = 50  # unequal tokens: the speed comparison is not judged
    t = compare.check_targets(passkey, {}, training)
    assert t["longgen_beats_sparse_and_attnsink_beyond_window"] is False
    assert t["longgen_trains_faster_than_full"] is None and "niah_within_10_points_of_full" not in t


def _write_run(
    run_dir: Path, *, seconds_per_step: float, steps: int = 4, tokens_per_step: int = 1000
) -> None:
    run_dir.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "loss": 3.0 - 0.1 * s,
            "tokens": s * tokens_per_step,
            "wall_clock_s": s * seconds_per_step,
        }
        for s in range(1, steps + 1)
    ]
    rows[-1]["eval_loss"] = 2.5
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.json").write_text(
        json.dumps({"train": {"seed": 7}, "model": {"layer_pattern": "SFS"}})
    )
    (run_dir / "process_time.json").write_text(json.dumps({"process_wall_s": steps * seconds_per_step + 30}))


def test_compare_end_to_end_on_written_reports(tmp_path):
    work = tmp_path / "work"
    for variant, seconds in (("longgen", 1.0), ("sparse_only", 0.8), ("full", 1.3)):
        _write_run(work / "train" / variant, seconds_per_step=seconds)
    for model, acc in (
        ("original", 0.0),
        ("longgen", 1.0),
        ("sparse_only", 0.0),
        ("full", 1.0),
        ("attnsink_inference", 0.0),
    ):
        (work / "eval" / model).mkdir(parents=True)
        trials = [
            {"length": n, "depth": d, "correct": bool(acc) or n <= 2048}
            for n in (2048, 4096)
            for d in (0.0, 0.5, 1.0)
        ]
        for kind in ("passkey", "niah"):
            (work / "eval" / model / f"{kind}.json").write_text(json.dumps({"results": trials}))
        # tools/eval_ppl_by_position.py's shape: per-bin `bins`, the whole-document `ppl`
        bins = [
            {"start": a, "end": b, "ppl": p}
            for a, b, p in ((0, 1024, 9.0), (1024, 2048, 8.0), (2048, 4096, 7.0 + acc))
        ]
        (work / "eval" / model / "ppl.json").write_text(json.dumps({"bins": bins, "ppl": 7.9}))
    out = tmp_path / "results"
    result = compare.main(["--workdir", str(work), "--device", "test", "--out-dir", str(out)])
    written = json.loads((out / "smollm2_32k_test.json").read_text())
    assert written["passkey"]["longgen"] == {"2048": 1.0, "4096": 1.0}
    assert written["passkey"]["sparse_only"] == {"2048": 1.0, "4096": 0.0}
    assert written["ppl_by_position"]["longgen"] == {
        "positions": [512.0, 1536.0, 3072.0],
        "ppl": [9.0, 8.0, 8.0],
    }
    assert written["training"]["full"] == {
        "tokens": 4000,
        "steps": 4,
        "wall_clock_s": 5.2,
        "tokens_per_s": 4000 / 5.2,
        "process_wall_s": 35.2,
        "seed": 7,
        "layer_pattern": "SFS",
        "final_loss": pytest.approx(2.6),
        "eval_loss": 2.5,
        "peak_mem_gib": None,
    }
    assert written["targets"]["longgen_beats_sparse_and_attnsink_beyond_window"] is True
    assert written["targets"]["full_over_longgen_wall_clock"] == pytest.approx(1.3)
    assert result["missing"] == []
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("passkey", "niah", "loss_tokens", "loss_wallclock", "ppl_position"):
            assert (out / f"smollm2_32k_test_{name}.png").stat().st_size > 1000, name
