"""Layer specs from the pattern, and Transformer Engine chosen explicitly (`ModelConfig.transformer_impl`).

- `local` (the default) builds Megatron's parallel linears, our RMSNorm and `LongGenCoreAttention` for
  both layer kinds, and never imports Transformer Engine (checked with TE's modules made unimportable);
- `transformer_engine` without TE installed is a ValueError with the install hint;
- with TE installed (and a GPU), the TE spec builds and trains a step (`requires_te`).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from megatron_longgen.attention.core_attention import LongGenCoreAttention
from megatron_longgen.config import apply_overrides, config_from_dict, config_to_dict
from megatron_longgen.megatron_bridge import to_transformer_config
from megatron_longgen.models.builder import build_model
from megatron_longgen.models.layer_specs import build_block_spec
from megatron_longgen.models.norms import RMSNorm
from megatron_longgen.utils import optional
from megatron_longgen.utils.distributed import init_distributed, initialize_model_parallel, set_seed
from megatron_longgen.utils.optional import has_te
from tests.models.test_model import tiny_cfg

requires_te = pytest.mark.skipif(
    not has_te(), reason="Transformer Engine is not installed (pip install 'megatron_longgen[te]')"
)
TE_MODULES = (
    "transformer_engine",
    "transformer_engine.pytorch",
    "megatron.core.extensions.transformer_engine",
)


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_distributed()
    yield


def _spec_classes(spec) -> set[str]:
    """Names of every module class a block spec names (recursively through ModuleSpecs/submodules)."""
    names = set()

    def walk(x):
        if isinstance(x, type):
            names.add(x.__name__)
        elif hasattr(x, "module"):
            walk(x.module)
            walk(getattr(x, "submodules", None))
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)

    walk(spec)
    return names


def test_transformer_impl_defaults_to_local_and_is_validated():
    cfg = tiny_cfg()
    assert cfg.model.transformer_impl == "local"
    assert to_transformer_config(cfg).transformer_impl == "local"
    with pytest.raises(
        ValueError, match="transformer_impl must be one of .*'local', 'transformer_engine'.*got 'te'"
    ):
        dataclasses.replace(cfg.model, transformer_impl="te")
    te = apply_overrides(cfg, ["model.transformer_impl=transformer_engine"])
    assert te.model.transformer_impl == "transformer_engine"
    assert config_from_dict(config_to_dict(te)).model.transformer_impl == "transformer_engine"


def test_local_never_imports_transformer_engine(monkeypatch):
    import megatron.core.extensions.transformer_engine  # noqa: F401  (Megatron's own, restored below)

    for name in TE_MODULES:  # any import of them now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    cfg = tiny_cfg("SFFS")
    initialize_model_parallel(cfg)
    spec = build_block_spec(cfg.model.layer_pattern, sparse=cfg.sparse, config=to_transformer_config(cfg))
    names = _spec_classes(spec)
    assert {"LongGenCoreAttention", "ColumnParallelLinear", "RowParallelLinear", "RMSNorm"} <= names
    assert not {n for n in names if n.startswith("TE")}
    # Megatron's TransformerLayer imports its TE extension module itself (which works without TE);
    # the TE package stays unimportable while the model is built and run.
    monkeypatch.delitem(sys.modules, "megatron.core.extensions.transformer_engine")
    set_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 100, (2, 48))
    loss = model(ids, torch.arange(48)[None].expand(2, -1), None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert [c.kind for c in cores] == ["sparse", "full", "full", "sparse"]
    assert isinstance(model.decoder.final_layernorm, RMSNorm)


def test_transformer_engine_without_te_is_a_clear_error(monkeypatch):
    real = optional._has
    monkeypatch.setattr(optional, "_has", lambda module: module != "transformer_engine" and real(module))
    cfg = apply_overrides(tiny_cfg(), ["model.transformer_impl=transformer_engine"])
    initialize_model_parallel(cfg)
    with pytest.raises(
        ValueError,
        match=r"needs the optional package 'transformer_engine': pip install "
        r"'megatron_longgen\[te\]' \(or set model.transformer_impl=local\)",
    ):
        build_block_spec(
            cfg.model.layer_pattern,
            sparse=cfg.sparse,
            config=to_transformer_config(cfg),
            transformer_impl=cfg.model.transformer_impl,
        )
    with pytest.raises(ValueError, match="transformer_engine"):
        build_model(cfg)


@requires_te
@pytest.mark.gpu
def test_transformer_engine_spec_builds_and_trains_a_step():
    cfg = apply_overrides(tiny_cfg("SFFS"), ["model.transformer_impl=transformer_engine"])
    initialize_model_parallel(cfg)
    spec = build_block_spec(
        cfg.model.layer_pattern,
        sparse=cfg.sparse,
        config=to_transformer_config(cfg),
        transformer_impl="transformer_engine",
    )
    names = _spec_classes(spec)
    assert {
        "TELayerNormColumnParallelLinear",
        "TERowParallelLinear",
        "TEDotProductAttention",
        "TENorm",
    } <= names
    set_seed(0)
    model = build_model(cfg).cuda()
    kinds = [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers]
    assert kinds == [
        "LongGenCoreAttention",
        "TEDotProductAttention",
        "TEDotProductAttention",
        "LongGenCoreAttention",
    ]
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(c.kind == "sparse" for c in cores if isinstance(c, LongGenCoreAttention))
    ids = torch.randint(0, 100, (2, 48), device="cuda")
    loss = model(ids, torch.arange(48, device="cuda")[None].expand(2, -1), None, labels=ids).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
