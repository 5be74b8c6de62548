"""examples/smollm2_32k end to end on CPU, on a tiny random model of the SmolLM2 family, through the user's
scripts: GGUF -> prepare_model.py (-> convert) -> build_data.py (-> preprocess) -> train.sh for each of the
three recipes (scaled down by overrides) -> export.sh -> evaluation -> compare.py.

The tiny model is a Llama with tied embeddings, GQA (4 query / 2 KV heads) and RoPE base 100,000, written
as a llama.cpp-style F32 GGUF with a byte-level BPE tokenizer trained in the test. Oracles: the model the
GGUF was written from (prepare_model.py must give back its logits; the trained `full` export must match the
Megatron checkpoint it came from) and the recipes (each run trains its recipe's layout on the same tokens).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longgen.recipes import get_recipe
from tests.data.byte_bpe import train_raw_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "smollm2_32k"
VARIANTS = ("longgen", "sparse_only", "full")
VOCAB, SEQ, STEPS, GBS = 400, 256, 3, 2
# The recipes' 30-layer patterns sampled every 5th layer: longgen SSFFSS, sparse_only SSSSSS, full FFFFFF.
TINY = (
    "model.num_layers=6 model.hidden_size=64 model.num_attention_heads=4 model.num_query_groups=2 "
    f"model.ffn_hidden_size=128 model.vocab_size={VOCAB} train.seq_length={SEQ} train.global_batch_size={GBS} "
    "train.dtype=fp32 train.lr=1e-3 train.lr_warmup_steps=1 train.eval_interval=2 "
    "sparse.block_size=16 sparse.num_window_blocks=4 data.valid_fraction=0.25"
)


def tiny_pattern(variant: str) -> str:
    return get_recipe(f"smollm2_32k_{variant}").model.layer_pattern[2::5]


def run(cmd: list[str], *, env: dict | None = None, timeout: int = 900) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def tiny_gguf_model(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.examples.tiny_gguf import write_llama_gguf

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # attention that is not uniform, so RoPE and the Q/K permutation matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    return model, write_llama_gguf(gguf_dir / "tiny.gguf", model, train_raw_tokenizer(vocab_size=VOCAB))


def fake_site_packages(tmp_path: Path) -> tuple[Path, Path]:
    """A small 'installation' for build_data.py: this repository's own packages as the code, a METADATA and
    a licence file; plus a licences folder."""
    root = tmp_path / "site-packages"
    for package in ("megatron_longgen", "tools"):
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.model")
        )
    dist = root / "megatron_longgen-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Name: megatron_longgen\n\n" + (REPO / "README.md").read_text())
    (dist / "LICENSE").write_text(
        "Apache License, Version 2.0. Permission is granted to use this software.\n" * 20
    )
    licenses = tmp_path / "common-licenses"
    licenses.mkdir()
    (licenses / "MIT").write_text("Permission is hereby granted, free of charge, to any person. " * 50)
    return root, licenses


def evaluate(workdir: Path) -> None:
    """The evaluation step: evaluate.sh (tools/eval_passkey.py, eval_niah.py, eval_ppl_by_position.py) at
    tiny sizes for every model."""
    run(
        ["bash", str(EXAMPLE / "evaluate.sh")],
        env={
            "WORKDIR": str(workdir),
            "PYTHON": sys.executable,
            "LENGTHS": "512 1024",
            "DEPTHS": "0.0 0.5 1.0",
            "SAMPLES": "1",
            "PPL_DOCS": "1",
            "PPL_LENGTH": "512",
            "PPL_BIN": "128",
            "DTYPE": "fp32",
        },
    )


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~2 minutes on 2 idle cores; generous for shared CI machines
def test_smollm2_pipeline(tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_longgen.checkpoint.hf_model import LongGenLlamaForCausalLM
    from megatron_longgen.checkpoint.loading import load_model
    from megatron_longgen.utils.distributed import destroy

    workdir = tmp_path / "work"
    reference, gguf = tiny_gguf_model(tmp_path)

    # 1. prepare: GGUF -> HF folder (+ checks: reload, Megatron logits) -> Megatron checkpoint.
    out = run(
        [
            sys.executable,
            str(EXAMPLE / "prepare_model.py"),
            "--gguf",
            str(gguf),
            "--workdir",
            str(workdir),
            "--max-ppl",
            "inf",
        ]
    )
    assert "Megatron checkpoint vs HF logits" in out
    hf_original = workdir / "hf" / "original"
    report = json.loads((hf_original / "prepare_report.json").read_text())
    assert (
        report["bos_token_id"] == 0 and report["vocab_size"] == VOCAB and report["mcore_max_abs_diff"] < 1e-3
    )
    prepared = LlamaForCausalLM.from_pretrained(hf_original, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    # 2. data: a small installation -> corpus -> indexed dataset with the prepared (byte-level BPE) tokenizer.
    root, licenses = fake_site_packages(tmp_path)
    run(
        [
            sys.executable,
            str(EXAMPLE / "build_data.py"),
            "--workdir",
            str(workdir),
            "--roots",
            str(root),
            "--licenses-dir",
            str(licenses),
            "--target-tokens",
            "60000",
            "--max-doc-chars",
            "6000",
            "--synthetic-doc-chars",
            "2000",
            "4000",
            "--heldout-docs",
            "1",
            "--heldout-min-chars",
            "5000",
            "--long-threshold",
            "2048",
            "--workers",
            "1",
        ]
    )
    stats = json.loads((workdir / "data" / "build_stats.json").read_text())
    shares = {s: v["share_out"] for s, v in stats["tokens_per_source"].items()}
    assert set(shares) == {"code", "docs", "licenses", "synthetic"} and 0 < shares["synthetic"] <= 0.25
    assert stats["tokens_out"] > 20000 and len(stats["heldout"]) == 1
    heldout = json.loads((workdir / "data" / "heldout.jsonl").read_text().splitlines()[0])
    first_file = heldout["text"].split("\n", 1)[0]  # "# file: <path>"
    assert first_file.startswith("# file: ")
    assert json.dumps(first_file)[1:-1] not in (workdir / "data" / "corpus" / "code.jsonl").read_text(), (
        "a held-out file is also in the training corpus"
    )

    # 3-4. train each recipe (scaled down) on the same tokens, then export.
    for variant in VARIANTS:
        env = {
            "WORKDIR": str(workdir),
            "PYTHON": sys.executable,
            "OVERRIDES": f"{TINY} model.layer_pattern={tiny_pattern(variant)}",
        }
        run(["bash", str(EXAMPLE / "train.sh"), variant, "--max-steps", str(STEPS), "--quiet"], env=env)
        run(["bash", str(EXAMPLE / "export.sh"), variant], env=env)
        config = json.loads((workdir / "train" / variant / "config.json").read_text())
        assert config["name"] == f"smollm2_32k_{variant}"
        assert config["model"]["layer_pattern"] == tiny_pattern(variant)
        assert config["model"]["tie_embeddings"] and config["model"]["rotary_base"] == 1_000_000.0
        exported = json.loads((workdir / "hf" / variant / "config.json").read_text())
        assert exported["longgen"]["layer_pattern"] == tiny_pattern(variant)
        assert (workdir / "hf" / variant / "tokenizer.json").is_file()
    assert tiny_pattern("longgen") == "SSFFSS"

    # The trained `full` export runs in transformers with the logits of the Megatron checkpoint it came from.
    ckpts = workdir / "train" / "full" / "checkpoints"
    mcore, _ = load_model(ckpts / (ckpts / "latest").read_text().strip(), dtype="fp32")
    exported = LongGenLlamaForCausalLM.from_pretrained(workdir / "hf" / "full", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = mcore(ids, torch.arange(ids.shape[1])[None], None)
        torch.testing.assert_close(exported(ids).logits, expected, atol=2e-4, rtol=1e-4)
    destroy()

    # 5. evaluation.
    evaluate(workdir)

    # 6. compare.
    results = tmp_path / "results"
    run(
        [
            sys.executable,
            str(EXAMPLE / "compare.py"),
            "--workdir",
            str(workdir),
            "--device",
            "cpu",
            "--out-dir",
            str(results),
        ]
    )
    summary = json.loads((results / "smollm2_32k_cpu.json").read_text())
    training = summary["training"]
    assert set(training) == set(VARIANTS)
    for variant, t in training.items():
        assert t["tokens"] == STEPS * GBS * SEQ and t["steps"] == STEPS and t["seed"] == 1234, variant
        assert t["wall_clock_s"] > 0 and t["tokens_per_s"] > 0 and t["process_wall_s"] >= t["wall_clock_s"]
    assert summary["targets"]["full_over_longgen_wall_clock"] > 0
    assert summary["data"]["tokens_out"] == stats["tokens_out"] and summary["model"]["vocab_size"] == VOCAB
    for kind in ("passkey", "niah"):
        assert set(summary[kind]) == {"original", "longgen", "sparse_only", "full", "attnsink_inference"}
        for accuracies in summary[kind].values():
            assert set(accuracies) == {"512", "1024"} and all(0 <= a <= 1 for a in accuracies.values())
    for model, curve in summary["ppl_by_position"].items():
        assert curve["positions"] == [64.0, 192.0, 320.0, 448.0], model  # 512 tokens in bins of 128
        assert all(1.0 < p < 1e6 for p in curve["ppl"]), model
    plots = ("passkey", "niah", "loss_tokens", "loss_wallclock", "ppl_position")
    if importlib.util.find_spec("matplotlib") is not None:
        for name in plots:
            assert (results / f"smollm2_32k_cpu_{name}.png").stat().st_size > 1000, name
