"""Checkpoints converted for TP=2 and PP=2 load at that layout under 2 gloo ranks and give HF's logits.

The workers start once for the module (importing Megatron-Core costs seconds per process)."""

import pytest
import torch

from megatron_longgen.checkpoint.convert import hf_to_mcore, mcore_to_hf
from tests.checkpoint.conftest import VOCAB
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier


def _load(cfg, mcore_dir, *, pre_process: bool, post_process: bool):
    from megatron.core import dist_checkpointing

    from megatron_longgen.checkpoint import format as ckpt_format
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    initialize_model_parallel(cfg)
    set_seed(0)
    model = build_model(cfg, pre_process=pre_process, post_process=post_process)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_format.model_dir(mcore_dir)))
    model.load_state_dict(state)
    return model.eval()


def _save_like_trainer(model, cfg, out_dir, rank):
    """What the trainer writes: longgen_config.json + dist checkpoint of model.sharded_state_dict()."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_longgen.checkpoint import format as ckpt_format

    if rank == 0:
        ckpt_format.model_dir(out_dir).mkdir(parents=True)
        ckpt_format.save_config(cfg, out_dir)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_format.model_dir(out_dir)))
    dist.barrier()


def _worker(rank, world_size, tp_dir, pp_dir, ids, saved_root):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longgen.checkpoint import format as ckpt_format

    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    out = {}
    # TP=2: each rank holds half the heads and half the (padded) vocabulary of the logits.
    cfg = ckpt_format.load_config(tp_dir)
    model = _load(cfg, tp_dir, pre_process=True, post_process=True)
    with torch.no_grad():
        local = model(ids, pos, None)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    out["tp_logits"] = torch.cat(parts, dim=-1)[..., :VOCAB].numpy()  # numpy: tensors would travel as shm fds
    _save_like_trainer(model, cfg, f"{saved_root}/tp2", rank)
    # PP=2: stage 0 runs layers 0-1 and sends hidden states [s, b, h] to stage 1 (layers 2-3 + head).
    cfg = ckpt_format.load_config(pp_dir)
    first = rank == 0
    model = _load(cfg, pp_dir, pre_process=first, post_process=not first)
    with torch.no_grad():
        if first:
            hidden = model(ids, pos, None)
            dist.send(hidden.contiguous(), dst=1)
        else:
            hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.model.hidden_size)
            dist.recv(hidden, src=0)
            model.set_input_tensor(hidden)
            out["pp_logits"] = model(ids, pos, None)[..., :VOCAB].numpy()
    _save_like_trainer(model, cfg, f"{saved_root}/pp2", rank)
    return out


@pytest.fixture(scope="module")
def results(hf_models, token_ids, tmp_path_factory):
    folder, hf_model = hf_models["gqa_tied_sharded"]
    root = tmp_path_factory.mktemp("parallel")
    hf_to_mcore(hf_dir=folder, out_dir=root / "tp2", tensor_parallel=2, pattern="full")
    hf_to_mcore(hf_dir=folder, out_dir=root / "pp2", pipeline_parallel=2, pattern="full")
    with torch.no_grad():
        expected = hf_model(token_ids).logits
    saved = root / "saved"
    ranks = run_distributed(
        _worker,
        world_size=2,
        args=(str(root / "tp2"), str(root / "pp2"), token_ids, str(saved)),
        timeout_s=240,
    )
    return ranks, expected, saved, folder


@pytest.mark.timeout(300)
def test_tp2_logits_match_hf(results):
    ranks, expected, _, _ = results
    for rank in ranks:
        diff = (torch.from_numpy(rank["tp_logits"]) - expected).abs().max().item()
        assert diff <= 1e-4, f"TP=2 max |mcore - hf| = {diff}"


@pytest.mark.timeout(300)
def test_pp2_logits_match_hf(results):
    ranks, expected, _, _ = results
    assert "pp_logits" not in ranks[0]
    diff = (torch.from_numpy(ranks[1]["pp_logits"]) - expected).abs().max().item()
    assert diff <= 1e-4, f"PP=2 max |mcore - hf| = {diff}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_export_of_checkpoint_written_by_two_ranks_is_bit_exact(layout, results, tmp_path):
    """A checkpoint physically written at TP=2 (split QKV / SwiGLU chunks) or PP=2 exports to the
    original HF tensors."""
    from safetensors.torch import load_file

    _, _, saved, folder = results
    mcore_to_hf(mcore_dir=saved / layout, out_dir=tmp_path / "hf")
    original = {}
    for path in sorted(folder.glob("*.safetensors")):
        original.update(load_file(str(path)))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
