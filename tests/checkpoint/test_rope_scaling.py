"""RoPE length-extension options survive conversion: HF Llamas with linear interpolation or YaRN give the
same logits through Megatron-Core, and the export records the same `rope_parameters`."""

import json

import pytest
import torch

from megatron_longgen.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_longgen.checkpoint.loading import load_model
from tests.checkpoint.conftest import VOCAB

SEQ = 96  # beyond the "original" 32 positions, where the scalings differ from plain RoPE

ROPE = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _teardown_process_group():
    yield
    from megatron_longgen.utils.distributed import destroy

    destroy()


@pytest.mark.parametrize("kind", sorted(ROPE))
def test_scaled_rope_logits_match_hf(kind, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        rope_parameters=dict(ROPE[kind]),
    )
    hf_model = LlamaForCausalLM(hf_cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = hf_to_mcore(hf_dir=tmp_path / "hf", out_dir=tmp_path / "mcore", pattern="full", dtype="fp32")
    assert cfg.model.rope_scaling == kind and cfg.model.rope_scaling_factor == 4.0
    if kind == "yarn":
        assert cfg.model.rope_original_max_position == 32

    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(tmp_path / "mcore")
    with torch.no_grad():
        ours = model(ids, torch.arange(SEQ)[None].expand_as(ids), None)
        theirs = hf_model(ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max |mcore - hf| = {diff}"

    mcore_to_hf(mcore_dir=tmp_path / "mcore", out_dir=tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())["rope_parameters"]
    for key, value in ROPE[kind].items():
        assert exported[key] == value, (key, exported)
