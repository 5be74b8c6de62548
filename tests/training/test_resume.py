"""Single rank, in one spawned process: loss falls, and 10 steps + resume + 10 steps reproduce 20 straight
steps bit for bit (losses, gradient norms and final weights); checkpoint rotation and `latest`; weights-only
initialisation from a checkpoint folder (the converted-HF path)."""

import pytest

from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier


def _params(trainer) -> dict:
    module = trainer.model[0].module
    # numpy, not tensors: torch's multiprocessing queue would pass tensors through shared memory that dies
    # with the worker process.
    return {name: p.detach().float().numpy().copy() for name, p in module.named_parameters()}


def _init_from_converted_hf(root):
    """A tiny random HF Llama -> converter -> `train.init_checkpoint`: the first training loss (taken before
    the first update) equals the HF model's loss on the same batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longgen.checkpoint.convert import hf_to_mcore
    from megatron_longgen.training.trainer import Trainer

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            torch_dtype=torch.float32,
        )
    ).eval()
    hf.save_pretrained(root / "hf")
    hf_to_mcore(hf_dir=root / "hf", out_dir=root / "hf_mcore", pattern="full", dtype="fp32", seq_length=128)
    cfg = tiny_config(
        "train.max_steps=1",
        "train.save_on_exit=false",
        f"train.init_checkpoint={root / 'hf_mcore'}",
        pattern="FFFF",
    )
    trainer = Trainer(cfg, run_dir=root / "from_hf", quiet=True)
    batches = list(trainer._iterator(trainer.train_data, 0))
    with torch.no_grad():
        loss_sum, count = 0.0, 0.0
        for batch in batches:
            logits = hf(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
            per_token = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            loss_sum += float((per_token * batch["loss_mask"].flatten()).sum())
            count += float(batch["loss_mask"].sum())
    return {"ours": trainer.fit().losses[0], "hf": loss_sum / count}


def _worker(rank, world_size, root):
    from pathlib import Path

    from megatron_longgen.training.checkpointing import complete_checkpoints, latest_checkpoint
    from megatron_longgen.training.trainer import Trainer

    root = Path(root)
    cfg = tiny_config("train.max_steps=20", "train.keep_last_checkpoints=2", "train.eval_interval=10")
    out = {}
    straight = Trainer(cfg, run_dir=root / "straight", quiet=True)
    out["straight"] = straight.fit()
    out["straight_params"] = _params(straight)

    first = Trainer(cfg, run_dir=root / "split", quiet=True)
    out["first"] = first.fit(stop_after_steps=10)
    out["after_first"] = [p.name for p in complete_checkpoints(root / "split" / "checkpoints")]
    second = Trainer(cfg, run_dir=root / "split", quiet=True)
    out["second"] = second.fit(resume=True)
    out["second_params"] = _params(second)
    out["latest"] = latest_checkpoint(root / "split" / "checkpoints").name

    # Save every 4 steps, keep 2: only the newest two complete folders remain.
    rot = Trainer(
        tiny_config("train.max_steps=12", "train.save_interval=4", "train.keep_last_checkpoints=2"),
        run_dir=root / "rot",
        quiet=True,
    )
    rot.fit()
    out["rotation"] = [p.name for p in complete_checkpoints(root / "rot" / "checkpoints")]

    # Weights-only init from the final checkpoint of the straight run: first loss = loss of those weights.
    init_cfg = tiny_config(
        "train.max_steps=1", f"train.init_checkpoint={root / 'straight' / 'checkpoints' / 'step_0000020'}"
    )
    init = Trainer(init_cfg, run_dir=root / "init", quiet=True)
    init_params = None
    init.restore(resume=False)
    init_params = _params(init)
    out["init_matches"] = all((init_params[k] == out["straight_params"][k]).all() for k in init_params)

    out["hf"] = _init_from_converted_hf(root)

    # Activation recomputation changes memory, not numerics.
    out["recompute"] = {
        mode: Trainer(
            tiny_config("train.max_steps=3", "train.save_on_exit=false", f"train.recompute={mode}"),
            run_dir=root / f"recompute_{mode}",
            quiet=True,
        )
        .fit()
        .losses
        for mode in ("none", "selective", "full")
    }

    # RoPE length extension: same weights, different rotary embedding; recorded in the checkpoint.
    from megatron_longgen.checkpoint.format import load_config

    out["rope"] = {}
    for scaling in ("none", "linear", "yarn"):
        extra = (
            ()
            if scaling == "none"
            else ("model.rope_scaling_factor=4", "model.rope_original_max_position=32")
        )
        rope_cfg = tiny_config("train.max_steps=1", f"model.rope_scaling={scaling}", *extra)
        trainer = Trainer(rope_cfg, run_dir=root / f"rope_{scaling}", quiet=True)
        result = trainer.fit()
        saved = load_config(result.checkpoint_dir).model
        out["rope"][scaling] = {
            "loss": result.losses[0],
            "module": type(trainer.model[0].module.rotary_pos_emb).__name__,
            "saved": (saved.rope_scaling, saved.rope_scaling_factor, saved.rope_original_max_position),
        }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(
        _worker, world_size=1, args=(str(tmp_path_factory.mktemp("resume")),), timeout_s=400
    )[0]


def test_loss_decreases(results):
    losses = results["straight"].losses
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses


def test_resume_is_bit_identical(results):
    straight, first, second = results["straight"].losses, results["first"].losses, results["second"].losses
    assert len(first) == 10 and len(second) == 10
    assert first == straight[:10]
    assert second == straight[10:], [a - b for a, b in zip(second, straight[10:])]
    for name, value in results["straight_params"].items():
        assert (value == results["second_params"][name]).all(), name


def test_checkpoints_published_and_rotated(results):
    assert results["after_first"] == ["step_0000010"]
    assert results["latest"] == "step_0000020"
    assert results["rotation"] == ["step_0000008", "step_0000012"]


def test_init_from_checkpoint_loads_weights(results):
    assert results["init_matches"]


def test_rope_scaling_variants_build_differ_and_are_recorded(results):
    rope = results["rope"]
    assert rope["none"]["module"] == "RotaryEmbedding" and rope["linear"]["module"] == "RotaryEmbedding"
    assert rope["yarn"]["module"] == "YarnRotaryEmbedding"
    losses = [rope[k]["loss"] for k in ("none", "linear", "yarn")]
    assert len(set(losses)) == 3, losses  # same weights and batch: only the positions' rotation differs
    assert rope["none"]["saved"] == ("none", 1.0, 4096)
    assert rope["linear"]["saved"] == ("linear", 4.0, 32)
    assert rope["yarn"]["saved"] == ("yarn", 4.0, 32)


def test_init_from_converted_hf_checkpoint_matches_hf_loss(results):
    assert results["hf"]["ours"] == pytest.approx(results["hf"]["hf"], rel=1e-5)


def test_recompute_selective_and_full_match_none(results):
    runs = results["recompute"]
    assert len(runs["none"]) == 3
    assert runs["selective"] == runs["none"]
    assert runs["full"] == runs["none"]
