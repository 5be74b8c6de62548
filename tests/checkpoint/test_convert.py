"""HF -> Megatron-Core -> HF on tiny random Llamas: logit parity, bit-exact round trip, sparse HF model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_longgen.checkpoint import format as ckpt_format
from megatron_longgen.checkpoint.convert import DEFAULT_MAX_STEPS, hf_to_mcore, mcore_to_hf
from megatron_longgen.checkpoint.loading import load_model
from tests.checkpoint.conftest import SEQ, VOCAB

SPARSE_OVERRIDES = (
    "sparse.block_size=4",
    "sparse.num_window_blocks=2",
    "sparse.stride_blocks=3",
    "sparse.num_local_blocks=2",
)


@pytest.fixture(scope="module", autouse=True)
def _teardown_process_group():
    yield
    from megatron_longgen.utils.distributed import destroy

    destroy()


def _hf_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _mcore_logits(mcore_dir, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(mcore_dir)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied_sharded"])
def test_mcore_logits_match_hf(name, hf_models, token_ids, tmp_path):
    folder, hf_model = hf_models[name]
    out = tmp_path / "mcore"
    cfg = hf_to_mcore(hf_dir=folder, out_dir=out, pattern="full", dtype="fp32")
    assert cfg.model.layer_pattern == "FFFF"
    assert ckpt_format.is_checkpoint(out)
    logits = _mcore_logits(out, token_ids)
    with torch.no_grad():
        expected = hf_model(token_ids).logits
    assert logits.shape == (2, SEQ, VOCAB)
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-4, f"max |mcore - hf| = {diff}"


def test_recorded_config(hf_models, tmp_path):
    folder, _ = hf_models["gqa_tied_sharded"]
    hf_to_mcore(
        hf_dir=folder,
        out_dir=tmp_path / "c",
        tensor_parallel=2,
        pipeline_parallel=2,
        sparse_variant="block_strided",
    )
    payload = json.loads((tmp_path / "c" / ckpt_format.CONFIG_FILE).read_text())
    assert payload["format_version"] == ckpt_format.FORMAT_VERSION
    cfg = ckpt_format.load_config(tmp_path / "c")
    m = cfg.model
    assert (m.num_query_groups, m.rotary_base, m.norm_epsilon, m.tie_embeddings) == (2, 50000.0, 1e-6, True)
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (2, 2)
    assert m.layer_pattern == "SFSS" and cfg.sparse.variant == "block_strided"
    assert (cfg.train.seq_length, cfg.train.max_steps, cfg.train.dtype) == (SEQ, DEFAULT_MAX_STEPS, "fp32")
    reader = ckpt_format.DistCheckpointReader(ckpt_format.model_dir(tmp_path / "c"))
    assert reader.global_shape("embedding.word_embeddings.weight") == (256, 64)  # padded to 128 * tp
    assert "output_layer.weight" not in reader.keys()  # noqa: SIM118 - tied


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied_sharded"])
def test_round_trip_is_bit_exact(name, hf_models, tmp_path):
    folder, _ = hf_models[name]
    hf_to_mcore(hf_dir=folder, out_dir=tmp_path / "mcore", tensor_parallel=2)
    mcore_to_hf(mcore_dir=tmp_path / "mcore", out_dir=tmp_path / "hf", max_shard_bytes=60_000)
    original, back = _hf_tensors(folder), _hf_tensors(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)


def test_bin_checkpoint_input(hf_models, token_ids, tmp_path):
    folder, hf_model = hf_models["mha_untied"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    hf_to_mcore(hf_dir=bin_dir, out_dir=tmp_path / "mcore", pattern="full")
    with torch.no_grad():
        expected = hf_model(token_ids).logits
    assert (_mcore_logits(tmp_path / "mcore", token_ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
def test_exported_longgen_model_matches_mcore_with_sparse_masks(variant, hf_models, token_ids, tmp_path):
    from megatron_longgen.checkpoint.hf_model import LongGenLlamaForCausalLM

    folder, dense_hf = hf_models["gqa_tied_sharded"]
    hf_to_mcore(
        hf_dir=folder,
        out_dir=tmp_path / "mcore",
        pattern="SFFS",
        sparse_variant=variant,
        overrides=SPARSE_OVERRIDES,
    )
    mcore_logits = _mcore_logits(tmp_path / "mcore", token_ids)
    hf_config = mcore_to_hf(mcore_dir=tmp_path / "mcore", out_dir=tmp_path / "hf")
    assert hf_config["longgen"]["layer_pattern"] == "SFFS" and hf_config["longgen"]["variant"] == variant
    model = LongGenLlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = model(token_ids).logits
        dense_logits = dense_hf(token_ids).logits
    diff = (hf_logits - mcore_logits).abs().max().item()
    assert diff <= 1e-4, f"max |hf longgen - mcore| = {diff}"
    # The masks really drop keys: the dense model differs clearly.
    assert (dense_logits - mcore_logits).abs().max().item() > 1e-2
    # The Auto API finds the class once registered.
    from transformers import AutoModelForCausalLM

    from megatron_longgen.checkpoint.hf_model import register_auto_classes

    register_auto_classes()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert isinstance(auto, LongGenLlamaForCausalLM)
    with torch.no_grad():
        assert (auto(token_ids).logits - hf_logits).abs().max().item() == 0.0
    # Re-importing the export keeps the recorded LongGen layout (no --pattern / --sparse-variant needed).
    again = hf_to_mcore(hf_dir=tmp_path / "hf", out_dir=tmp_path / "again")
    first = ckpt_format.load_config(tmp_path / "mcore")
    assert again.model.layer_pattern == "SFFS" and again.sparse == first.sparse
    # Decoding with a KV cache gives the same last-token logits as the full forward.
    with torch.no_grad():
        past = model(token_ids[:, :-1], use_cache=True).past_key_values
        step = model(token_ids[:, -1:], past_key_values=past, use_cache=True).logits
    assert (step[:, -1] - hf_logits[:, -1]).abs().max().item() <= 1e-4
