"""Tiny random HF Llama checkpoints shared by the checkpoint tests (built once per session)."""

import pytest
import torch

pytest.importorskip("transformers")

VOCAB = 100  # not a multiple of 128: exercises Megatron's vocabulary padding
SEQ = 48  # with block_size 4 and 2 window blocks the sparse layers drop most keys


def _hf_config(*, kv_heads: int, tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=SEQ,
    )


HF_MODELS = {
    # name: (kv heads, tied embeddings, save_pretrained max_shard_size)
    "mha_untied": (4, False, None),
    "gqa_tied_sharded": (2, True, "150KB"),
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (folder, model in eval mode). Random weights, norms perturbed so they matter."""
    from transformers import LlamaForCausalLM

    out = {}
    for i, (name, (kv_heads, tied, shard)) in enumerate(HF_MODELS.items()):
        torch.manual_seed(100 + i)
        model = LlamaForCausalLM(_hf_config(kv_heads=kv_heads, tied=tied)).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:
                    param.add_(0.1 * torch.randn_like(param))
        folder = tmp_path_factory.mktemp(name)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
        out[name] = (folder, model)
    return out


@pytest.fixture(scope="session")
def token_ids():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, SEQ), generator=generator)
