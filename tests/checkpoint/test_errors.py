"""Bad input: a clear error naming the file or numbers, exit status 2 from the CLIs, no partial output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longgen.checkpoint.convert import hf_to_mcore, mcore_to_hf

REPO = Path(__file__).resolve().parents[2]


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "temporary output folder left behind"


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(hf_models, tmp_path):
    src = _copy(hf_models["gqa_tied_sharded"][0], tmp_path / "hf")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {victim.name}, which is missing"):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_no_weights(hf_models, tmp_path):
    src = _copy(hf_models["mha_untied"][0], tmp_path / "hf")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*expected model.safetensors"):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_corrupt_safetensors(hf_models, tmp_path):
    src = _copy(hf_models["mha_untied"][0], tmp_path / "hf")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_config_weight_shape_mismatch(hf_models, tmp_path):
    src = _copy(hf_models["mha_untied"][0], tmp_path / "hf")
    _edit_config(src, intermediate_size=96)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch: model.layers.0.mlp.down_proj.weight .* \(64, 128\) "
        r"but config.json implies \(64, 96\)",
    ):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_wrong_layer_count(hf_models, tmp_path):
    src = _copy(hf_models["mha_untied"][0], tmp_path / "hf")
    _edit_config(src, num_hidden_layers=3)
    with pytest.raises(ValueError, match="not used by the conversion table.*model.layers.3"):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_unsupported_architecture(hf_models, tmp_path):
    src = _copy(hf_models["mha_untied"][0], tmp_path / "hf")
    _edit_config(src, architectures=["MixtralForCausalLM"], model_type="mixtral")
    with pytest.raises(ValueError, match=r"unsupported architecture \['MixtralForCausalLM'\]"):
        hf_to_mcore(hf_dir=src, out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_export_of_a_non_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="longgen_config.json not found"):
        mcore_to_hf(mcore_dir=tmp_path / "empty", out_dir=tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args, "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )


def test_cli_heads_not_divisible_by_tp(hf_models, tmp_path):
    result = _cli(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(hf_models["mha_untied"][0]),
        "--out",
        str(tmp_path / "out"),
        "--tp",
        "3",
    )
    assert result.returncode == 2
    assert "num_attention_heads 4 must be divisible by tensor_parallel 3" in result.stderr
    _assert_no_output(tmp_path / "out")


def test_cli_existing_output_needs_force(hf_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = _cli("convert_hf_to_mcore.py", "--hf-dir", str(hf_models["mha_untied"][0]), "--out", str(out))
    assert result.returncode == 2
    assert "already exists; pass --force" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    assert not list(tmp_path.glob("out.tmp-*"))
