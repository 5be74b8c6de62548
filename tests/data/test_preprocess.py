"""tools/preprocess_data.py: exact tokens with <bos>, workers-independent output, length sampling report,
and clear errors for empty input, bad files and unknown tokenizers."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longgen.data.indexed import validate_indexed_prefix
from megatron_longgen.data.length_sampling import LengthSampling
from megatron_longgen.data.preprocess import _token_dtype, preprocess
from tests.data.conftest import make_text, write_jsonl

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"


def _read_docs(prefix: str) -> list[list[int]]:
    info = validate_indexed_prefix(prefix)
    lengths = np.fromfile(prefix + ".idx", dtype=np.int32, count=info.num_sequences, offset=34)
    flat = np.fromfile(prefix + ".bin", dtype=info.dtype)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[bounds[i] : bounds[i + 1]].tolist() for i in range(lengths.size)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    records = [
        {"text": make_text(rng, rng.randint(3, 60)), "meta": {"set": "web" if i % 3 else "books"}}
        for i in range(150)
    ]
    records.insert(5, {"text": "   ", "meta": {"set": "web"}})  # empty: skipped and counted
    jsonl = write_jsonl(root / "a.jsonl", records)
    txt = root / "b.txt"
    txt.write_text("First story here.\n\nSecond one, a bit longer.\n\n\n\nThird.\n", encoding="utf-8")
    return {"jsonl": jsonl, "txt": str(txt), "records": records}


def test_exact_tokens_with_bos(tmp_path, inputs, tokenizer):
    prefix = str(tmp_path / "out")
    stats = preprocess(
        inputs=[inputs["jsonl"], inputs["txt"]],
        tokenizer="builtin:tiny_sp",
        output_prefix=prefix,
        progress=False,
    )
    texts = [r["text"] for r in inputs["records"] if r["text"].strip()]
    texts += ["First story here.", "Second one, a bit longer.", "Third."]
    docs = _read_docs(prefix)
    assert docs == [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    assert [tokenizer.decode(d[1:]) for d in docs] == texts
    assert (
        stats["empty_documents_skipped"] == 1
    )  # the blank jsonl text (blank-line runs in .txt only separate)
    assert stats["documents_out"] == len(texts) and stats["dtype"] == "uint16"
    on_disk = json.loads(Path(prefix + ".stats.json").read_text())
    assert on_disk["tokens_out"] == sum(map(len, docs))
    assert set(on_disk["sources"]) == {"a.jsonl", "b.txt"}
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx", "out.stats.json"]


def test_workers_do_not_change_output(tmp_path, inputs):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    preprocess(
        inputs=[inputs["jsonl"]], tokenizer="builtin:tiny_sp", output_prefix=one, workers=1, progress=False
    )
    preprocess(
        inputs=[inputs["jsonl"]], tokenizer="builtin:tiny_sp", output_prefix=two, workers=2, progress=False
    )
    for ext in (".bin", ".idx"):
        assert Path(one + ext).read_bytes() == Path(two + ext).read_bytes(), ext


def test_length_sampling_end_to_end(tmp_path, inputs, tokenizer):
    prefix = str(tmp_path / "long")
    sampling = LengthSampling(long_threshold=30, long_weight=3.0, short_weight=0.2)
    stats = preprocess(
        inputs=[inputs["jsonl"]],
        tokenizer="builtin:tiny_sp",
        output_prefix=prefix,
        source_key="meta.set",
        sampling=sampling,
        seed=3,
        progress=False,
    )
    docs = _read_docs(prefix)
    assert len(docs) == stats["documents_out"]
    assert sum(map(len, docs)) == stats["tokens_out"]
    assert set(stats["sources"]) == {"web", "books"}
    originals = {
        tuple([tokenizer.bos_id] + tokenizer.encode(r["text"]))
        for r in inputs["records"]
        if r["text"].strip()
    }
    assert all(tuple(d) in originals for d in docs)
    for src in stats["sources"].values():
        assert src["long_token_fraction_out"] > src["long_token_fraction_in"]
    # Copies are drawn with the seed: a rerun is byte-identical, leaving no temporary files behind.
    again = str(tmp_path / "again")
    preprocess(
        inputs=[inputs["jsonl"]],
        tokenizer="builtin:tiny_sp",
        output_prefix=again,
        source_key="meta.set",
        sampling=sampling,
        seed=3,
        progress=False,
    )
    assert Path(prefix + ".bin").read_bytes() == Path(again + ".bin").read_bytes()
    assert not [n for n in os.listdir(tmp_path) if ".raw" in n or ".tmp" in n]


@pytest.mark.parametrize(
    "content, suffix", [("", ".jsonl"), ("\n\n  \n", ".txt"), ('{"text": ""}\n', ".jsonl")]
)
def test_empty_input_is_a_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="hold no non-empty documents"):
        preprocess(
            inputs=[str(path)], tokenizer="builtin:tiny_sp", output_prefix=str(tmp_path / "o"), progress=False
        )
    assert os.listdir(tmp_path) == [path.name]


def test_failed_rerun_keeps_previous_output(tmp_path, inputs):
    prefix = str(tmp_path / "o")
    preprocess(inputs=[inputs["txt"]], tokenizer="builtin:tiny_sp", output_prefix=prefix, progress=False)
    before = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx", ".stats.json")}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        preprocess(inputs=[str(empty)], tokenizer="builtin:tiny_sp", output_prefix=prefix, progress=False)
    assert {ext: Path(prefix + ext).read_bytes() for ext in before} == before
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "o.bin", "o.idx", "o.stats.json"]


def test_bad_inputs(tmp_path):
    def run(files, **kw):
        preprocess(
            inputs=files, tokenizer="builtin:tiny_sp", output_prefix=str(tmp_path / "o"), progress=False, **kw
        )

    with pytest.raises(ValueError, match="input file .*nope.jsonl does not exist"):
        run([str(tmp_path / "nope.jsonl")])
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.csv'"):
        run([str(csv)])
    gz_parquet = tmp_path / "x.parquet.gz"
    gz_parquet.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.parquet\.gz'"):
        run([str(gz_parquet)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        run([str(bad)])
    nokey = write_jsonl(tmp_path / "nokey.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"nokey\.jsonl:1: key 'text' not found"):
        run([nokey])
    with pytest.raises(ValueError, match=r"key 'meta.set' not found"):
        run([write_jsonl(tmp_path / "nosrc.jsonl", [{"text": "x"}])], source_key="meta.set")
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run([nokey], workers=0)


def test_sampling_that_keeps_nothing_is_an_error(tmp_path, inputs):
    # All documents short and short_weight 0: no source can keep its share, nothing is written.
    sampling = LengthSampling(long_threshold=10_000, long_weight=1.0, short_weight=0.0)
    with pytest.raises(ValueError, match="length sampling kept no document"):
        preprocess(
            inputs=[inputs["jsonl"]],
            tokenizer="builtin:tiny_sp",
            output_prefix=str(tmp_path / "o"),
            sampling=sampling,
            progress=False,
        )
    assert not list(tmp_path.iterdir())


def test_hf_tokenizer_folder(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Ada", "walked", "to", "Oslo", "."]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Ada walked to Oslo ."}, {"text": "Oslo Oslo"}])
    stats = preprocess(
        inputs=[path], tokenizer=str(folder), output_prefix=str(tmp_path / "o"), progress=False
    )
    assert _read_docs(str(tmp_path / "o")) == [[1, 3, 4, 5, 6, 7], [1, 6, 6]]
    assert (stats["vocab_size"], stats["bos_id"]) == (8, 1)


def test_token_dtype_follows_vocab_size():
    assert _token_dtype(32000) is np.uint16 and _token_dtype(65536) is np.uint16
    assert _token_dtype(65537) is np.int32 and _token_dtype(128256) is np.int32


def test_gzip_inputs_match_plain_ones(tmp_path, inputs, tokenizer):
    plain = str(tmp_path / "plain")
    preprocess(
        inputs=[inputs["jsonl"], inputs["txt"]],
        tokenizer="builtin:tiny_sp",
        output_prefix=plain,
        progress=False,
    )
    gz_inputs = []
    for src in (inputs["jsonl"], inputs["txt"]):
        dst = tmp_path / (Path(src).name + ".gz")
        dst.write_bytes(gzip.compress(Path(src).read_bytes()))
        gz_inputs.append(str(dst))
    gz = str(tmp_path / "gz")
    stats = preprocess(inputs=gz_inputs, tokenizer="builtin:tiny_sp", output_prefix=gz, progress=False)
    assert _read_docs(gz) == _read_docs(plain)
    assert set(stats["sources"]) == {"a.jsonl.gz", "b.txt.gz"}


def test_zstd_input(tmp_path, monkeypatch, tokenizer):
    path = tmp_path / "d.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError, match="needs zstandard, which is not installed"):
            preprocess(
                inputs=[str(path)],
                tokenizer="builtin:tiny_sp",
                output_prefix=str(tmp_path / "o"),
                progress=False,
            )
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "one doc"}\n'))
    preprocess(
        inputs=[str(path)], tokenizer="builtin:tiny_sp", output_prefix=str(tmp_path / "o"), progress=False
    )
    assert _read_docs(str(tmp_path / "o")) == [[tokenizer.bos_id] + tokenizer.encode("one doc")]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="needs pyarrow, which is not installed"):
        preprocess(
            inputs=[str(path)], tokenizer="builtin:tiny_sp", output_prefix=str(tmp_path / "o"), progress=False
        )


def test_parquet_input(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["one doc", "two docs here"], "src": ["a", "b"]}), path)
    stats = preprocess(
        inputs=[str(path)],
        tokenizer="builtin:tiny_sp",
        output_prefix=str(tmp_path / "o"),
        source_key="src",
        progress=False,
    )
    assert _read_docs(str(tmp_path / "o")) == [
        [tokenizer.bos_id] + tokenizer.encode(t) for t in ("one doc", "two docs here")
    ]
    assert set(stats["sources"]) == {"a", "b"}


def test_cli_unknown_tokenizer_exits_with_message(tmp_path, inputs):
    result = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--input",
            inputs["jsonl"],
            "--tokenizer",
            str(tmp_path / "missing.model"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "preprocess_data.py: error: unknown tokenizer" in result.stderr
    assert not list(tmp_path.iterdir())
