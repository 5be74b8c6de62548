"""The eval CLIs and tools/generate.py on a tiny exported model (CPU): outputs, files, errors."""

import importlib.util
import json
import math
import sys

import pytest
import torch

from megatron_longgen.evaluation.cli import run_perplexity, run_retrieval
from megatron_longgen.evaluation.documents import load_documents
from megatron_longgen.evaluation.perplexity import nll_by_position
from tests.inference.reference import tiny_config, tiny_model

HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An exported LongGen folder (SFFS) and a plain all-full Llama folder, vocab of the tiny tokenizer."""
    root = tmp_path_factory.mktemp("models")
    longgen = tiny_model(tiny_config(layer_pattern="SFFS", vocab=1024), seed=0)
    longgen.save_pretrained(root / "longgen")
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = longgen.config.to_dict()
    for key in ("longgen", "model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**fields))
    plain.load_state_dict(longgen.state_dict())
    plain.save_pretrained(root / "llama")
    return root


def _model_args(folder, *extra):
    return ["--model", str(folder), "--tokenizer", "builtin:tiny_sp", "--device", "cpu", *extra]


def test_eval_passkey_writes_table_json_and_heatmap(folders, tmp_path, capsys):
    argv = _model_args(folders / "longgen", "--lengths", "300,420", "--depths", "0,1", "--samples", "1",
                       "--out-dir", str(tmp_path))  # fmt: skip
    assert run_retrieval(argv, tool="eval_passkey", tasks={"passkey": "passkey"}, default_task="passkey",
                         default_lengths="512") == 0  # fmt: skip
    result = json.loads((tmp_path / "passkey_model.json").read_text())
    assert result["layer_kinds"] == "SFFS" and result["lengths"] == [300, 420]
    assert set(result["accuracy"]) == {"300", "420"} and len(result["records"]) == 4
    assert all(r["generated"] is not None and 0.0 <= r["score"] <= 1.0 for r in result["records"])
    assert result["versions"]["torch"] == torch.__version__ and result["date"]
    out = capsys.readouterr().out
    assert "passkey accuracy" in out and "mean" in out
    assert (tmp_path / "passkey_model.png").exists() == HAS_PLOT


def test_eval_niah_attnsink_baseline_on_plain_llama(folders, tmp_path):
    """--kv-policy sink_window on an all-F (plain Llama) folder: every layer sparse (inference-only AttnSink)."""
    argv = _model_args(folders / "llama", "--task", "multivalue", "--needles", "2", "--lengths", "700",
                       "--depths", "0.5", "--samples", "1", "--kv-policy", "sink_window", "--kv-window-blocks", "8",
                       "--out-dir", str(tmp_path))  # fmt: skip
    tasks = {"single": "niah_single", "multikey": "niah_multikey", "multivalue": "niah_multivalue"}
    assert (
        run_retrieval(argv, tool="eval_niah", tasks=tasks, default_task="single", default_lengths="512") == 0
    )
    result = json.loads((tmp_path / "multivalue_sink_window.json").read_text())
    assert result["layer_kinds"] == "SSSS" and result["task"] == "niah_multivalue"
    assert result["records"][0]["expected"] and len(result["records"][0]["expected"]) == 2


def test_eval_errors_are_one_line(folders, tmp_path, capsys):
    argv = _model_args(folders / "longgen", "--lengths", "64", "--out-dir", str(tmp_path))
    tasks = {"multikey": "niah_multikey"}
    assert run_retrieval(argv + ["--task", "multikey"], tool="eval_niah", tasks=tasks, default_task="multikey",
                         default_lengths="512") == 1  # fmt: skip
    assert "too short" in capsys.readouterr().err
    assert run_retrieval(["--model", str(tmp_path / "missing")], tool="eval_passkey", tasks={"passkey": "passkey"},
                         default_task="passkey", default_lengths="512") == 1  # fmt: skip
    assert "config.json" in capsys.readouterr().err
    assert (
        run_perplexity(_model_args(folders / "longgen", "--kv-policy", "full", "--kv-window-blocks", "4"))
        == 1
    )
    assert "--kv-" in capsys.readouterr().err


@torch.no_grad()
def test_perplexity_by_position_matches_direct_computation(sp_tokenizer):
    model = tiny_model(tiny_config(layer_pattern="SF", vocab=1024), seed=7)
    docs = load_documents(["builtin:haystack"], sp_tokenizer, max_tokens=96, num_docs=3)
    assert len(docs) == 3 and all(len(d) == 96 and d[0] == sp_tokenizer.bos_id for d in docs)
    curve = nll_by_position(model, docs, bin_size=32)
    logp = torch.stack([model(torch.tensor([d]), use_cache=False).logits[0].log_softmax(-1) for d in docs])
    targets = torch.tensor(docs)[:, 1:]
    nll = -logp[:, :-1].gather(-1, targets[..., None])[..., 0]  # [docs, 95], position t = index + 1
    positions = torch.arange(1, 96)
    for row in curve["bins"]:
        sel = (positions >= row["start"]) & (positions < row["end"])
        assert math.isclose(row["nll"], nll[:, sel].mean().item(), rel_tol=1e-5)
        assert row["tokens"] == 3 * int(sel.sum())
    assert [r["start"] for r in curve["bins"]] == [0, 32, 64] and curve["tokens"] == 3 * 95


def test_eval_ppl_cli_with_overlay(folders, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The cat sat on the mat. " * 80)
    base = _model_args(folders / "longgen", "--documents", str(doc), "builtin:haystack", "--max-tokens", "128",
                       "--num-docs", "2", "--bin-size", "32", "--out-dir", str(tmp_path))  # fmt: skip
    assert run_perplexity(base + ["--name", "first"]) == 0
    assert (
        run_perplexity(
            base + ["--name", "second", "--kv-policy", "full", "--overlay", str(tmp_path / "first.json")]
        )
        == 0
    )
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["layer_kinds"] == "FFFF" and len(second["bins"]) == 4 and second["ppl"] > 1
    assert (tmp_path / "second.png").exists() == HAS_PLOT
    short = _model_args(folders / "longgen", "--documents", str(doc), "--max-tokens", "100000")
    assert run_perplexity(short) == 1
    assert "no document has 100000 tokens" in capsys.readouterr().err


def test_generate_streams_and_stops(folders, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, "tools")
    try:
        import generate
    finally:
        sys.path.pop(0)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    argv = _model_args(folders / "longgen", "--prompt-file", str(prompt), "--max-new-tokens", "12")
    assert generate.main(argv) == 0
    captured = capsys.readouterr()
    greedy = captured.out.rstrip("\n")
    assert "12 generated" in captured.err and "KV cache" in captured.err and "layers SFFS" in captured.err
    assert len(greedy) > 0
    # A stop string taken from the greedy text: generation ends there and the stop string is not printed.
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    assert generate.main(argv + ["--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == greedy[: greedy.index(stop)]
    assert generate.main(argv + ["--temperature", "0.9", "--top-p", "0.8", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert generate.main(argv + ["--temperature", "0.9", "--top-p", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert generate.main(argv[:-2] + ["--max-new-tokens", "0"]) == 1
