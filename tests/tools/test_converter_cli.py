"""The converters as a user runs them: every bad input ends with exit status 2 and one line naming the
value and the fix, nothing is left on disk, `--debug` / LONGGEN_DEBUG=1 bring the traceback back; the
exported folder carries a tokenizer that transformers loads; `--override` takes several pairs per flag;
the temporary folder of a killed conversion is removed by the next run (and a live run's is not)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.tools.conftest import dead_pid, run_tool

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier


def _one_error_line(result, prog: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0][len(f"{prog}: error: ") :]


def _nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not list(parent.glob(f"{name}.tmp-*")), "temporary output left behind"


# ----------------------------------------------------------------------------------- HF -> mcore


def test_missing_hf_folder(tmp_path):
    result = run_tool(
        "convert_hf_to_mcore.py", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2
    message = _one_error_line(result, "convert_hf_to_mcore")
    assert (
        message == f"{tmp_path / 'nope' / 'config.json'} not found: an HF checkpoint folder needs config.json"
    )
    _nothing_left(tmp_path, "o")


def test_config_json_not_json(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for item in tiny_hf.iterdir():
        (src / item.name).symlink_to(item)
    (src / "config.json").unlink()
    (src / "config.json").write_text("{not json")
    result = run_tool("convert_hf_to_mcore.py", "--hf-dir", str(src), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert _one_error_line(result, "convert_hf_to_mcore").startswith(
        f"{src / 'config.json'} is not valid JSON"
    )
    _nothing_left(tmp_path, "o")


@pytest.mark.parametrize(("flag", "value"), [("--tp", "0"), ("--pp", "-1"), ("--max-steps", "0")])
def test_non_positive_sizes(tiny_hf, tmp_path, flag, value):
    result = run_tool(
        "convert_hf_to_mcore.py", "--hf-dir", str(tiny_hf), "--out", str(tmp_path / "o"), flag, value
    )
    assert result.returncode == 2
    assert _one_error_line(result, "convert_hf_to_mcore") == f"{flag} must be >= 1, got {value}"
    _nothing_left(tmp_path, "o")


def test_bad_override_names_the_field(tiny_hf, tmp_path):
    result = run_tool(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(tiny_hf),
        "--out",
        str(tmp_path / "o"),
        "--override",
        "sparse.block_size=abc",
    )
    assert result.returncode == 2
    message = _one_error_line(result, "convert_hf_to_mcore")
    assert "sparse.block_size" in message and "abc" in message
    _nothing_left(tmp_path, "o")


def test_debug_flag_and_env_show_the_traceback(tiny_hf, tmp_path):
    args = ("--hf-dir", str(tiny_hf), "--out", str(tmp_path / "o"), "--tp", "0")
    for result in (
        run_tool("convert_hf_to_mcore.py", *args, "--debug"),
        run_tool("convert_hf_to_mcore.py", *args, env={"LONGGEN_DEBUG": "1"}),
    ):
        assert result.returncode == 1  # an uncaught exception
        assert "Traceback (most recent call last)" in result.stderr
        assert "UserError: --tp must be >= 1, got 0" in result.stderr


def test_override_takes_several_pairs_per_flag_and_repeats(tiny_hf, tmp_path):
    out = tmp_path / "o"
    result = run_tool(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(tiny_hf),
        "--out",
        str(out),
        "--quiet",
        "--override",
        "train.max_steps=7",
        "sparse.block_size=8",
        "--override",
        "train.seq_length=96",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "longgen_config.json").read_text())["config"]
    assert (config["train"]["max_steps"], config["sparse"]["block_size"], config["train"]["seq_length"]) == (
        7,
        8,
        96,
    )


def test_killed_conversion_leftovers_are_removed_and_live_ones_kept(tiny_hf, tmp_path):
    from megatron_longgen.utils.atomic_output import host_tag

    out = tmp_path / "o"
    stale = tmp_path / f"o.tmp-{host_tag()}-{dead_pid()}-abcd1234"
    live = tmp_path / f"o.tmp-{host_tag()}-{os.getpid()}-efgh5678"  # this test process: alive
    other_host = tmp_path / f"o.tmp-not{socket.gethostname()}-{dead_pid()}-ijkl9012"
    for folder in (stale, live, other_host):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "part.distcp").write_bytes(b"\0" * 100)
    result = run_tool("convert_hf_to_mcore.py", "--hf-dir", str(tiny_hf), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"convert_hf_to_mcore: removed {stale} (left by a killed run)" in result.stderr
    assert "Transformer Engine and Apex are not installed" not in result.stderr  # import noise hidden
    assert not stale.exists()
    assert live.is_dir() and other_host.is_dir()
    assert (out / "model" / "metadata.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", live.name, other_host.name])


# ----------------------------------------------------------------------------------- mcore -> HF


def test_export_of_a_non_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_tool(
        "convert_mcore_to_hf.py", "--mcore-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2
    message = _one_error_line(result, "convert_mcore_to_hf")
    assert (
        message
        == f"{tmp_path / 'empty' / 'longgen_config.json'} not found: not a LongGen Megatron-Core checkpoint folder"
    )
    _nothing_left(tmp_path, "o")


def test_export_shard_size_must_be_positive(tiny_mcore, tmp_path):
    result = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(tiny_mcore),
        "--out",
        str(tmp_path / "o"),
        "--max-shard-gb",
        "0",
    )
    assert result.returncode == 2
    assert _one_error_line(result, "convert_mcore_to_hf") == "--max-shard-gb must be > 0, got 0.0"
    _nothing_left(tmp_path, "o")


def test_export_existing_output_needs_force(tiny_mcore, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(tiny_mcore), "--out", str(out))
    assert result.returncode == 2
    assert (
        _one_error_line(result, "convert_mcore_to_hf")
        == f"output {out} already exists; pass --force to replace it"
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob("o.tmp-*"))


def test_export_unknown_tokenizer(tiny_mcore, tmp_path):
    result = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(tiny_mcore),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        str(tmp_path / "missing.model"),
    )
    assert result.returncode == 2
    assert _one_error_line(result, "convert_mcore_to_hf").startswith(
        f"unknown tokenizer '{tmp_path / 'missing.model'}'"
    )
    _nothing_left(tmp_path, "o")


def _hf_and_ours(folder: Path, spec: str, text: str):
    from transformers import AutoTokenizer

    from megatron_longgen.data.tokenizers import Tokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(text), Tokenizer(
        spec
    ).encode(text, add_bos=True)


TEXT = "Once upon a time,  there was\ta little dog named Ada.\nShe liked kites 1234."


def test_export_writes_the_training_tokenizer(tiny_mcore, tmp_path):
    """The config's data.tokenizer (builtin:tiny_sp, 1,024 tokens = the model's rows) is exported and
    transformers reproduces the training token ids (BOS first)."""
    out = tmp_path / "o"
    result = run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(tiny_mcore), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    hf_ids, ours = _hf_and_ours(out, "builtin:tiny_sp", TEXT)
    assert hf_ids == ours

    # An HF tokenizer folder given with --tokenizer is copied, and loads the same.
    again = tmp_path / "again"
    result = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(tiny_mcore),
        "--out",
        str(again),
        "--quiet",
        "--tokenizer",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer_config.json", "tokenizer.model"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert _hf_and_ours(again, "builtin:tiny_sp", TEXT)[0] == ours


def test_export_warns_when_the_tokenizer_does_not_fit(tmp_path):
    """A converted model whose config still names the demo tokenizer (100 rows vs 1,024 tokens): no
    tokenizer files, a warning with both numbers and the flag to pass, exit 0 (the weights are fine)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "hf")
    assert (
        run_tool(
            "convert_hf_to_mcore.py",
            "--hf-dir",
            str(tmp_path / "hf"),
            "--out",
            str(tmp_path / "m"),
            "--quiet",
        ).returncode
        == 0
    )
    result = run_tool(
        "convert_mcore_to_hf.py", "--mcore-dir", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "convert_mcore_to_hf: warning: no tokenizer written: builtin:tiny_sp has 1024 tokens but the model has "
        "100 embedding rows; pass --tokenizer PATH (a SentencePiece .model or an HF tokenizer folder) to include one"
    )
    assert not list((tmp_path / "o").glob("tokenizer*"))
    assert (tmp_path / "o" / "config.json").is_file()
