"""The trainer's gradients are those of the token-mean loss over the global batch.

Adam hides a wrong gradient scale (it is scale invariant), so a loss curve cannot catch it; this test
compares the gradients Megatron's schedule + finalize_model_grads leave in `main_grad` with a plain
autograd computation of mean(token losses) over the same micro-batches, on the same weights.
"""

import pytest
import torch

from megatron_longgen.config import apply_overrides
from megatron_longgen.recipes import debug_tiny


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from megatron_longgen.training.trainer import Trainer

    cfg = apply_overrides(
        debug_tiny(),
        [
            "train.seq_length=64",
            "train.micro_batch_size=1",
            "train.global_batch_size=3",
            "train.clip_grad=0",
            "train.lr_warmup_steps=0",
            "model.num_layers=3",
            "model.layer_pattern=SFS",
            "sparse.block_size=4",
            "sparse.num_window_blocks=2",
        ],
    )
    return Trainer(cfg, run_dir=tmp_path_factory.mktemp("run"), quiet=True)


def test_main_grads_equal_token_mean_loss_gradients(trainer):
    for m in trainer.model:
        m.zero_grad_buffer()
    trainer._run(trainer._iterator(trainer.train_data, 0), forward_only=False)
    module = trainer.model[0].module
    got = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}

    batches = list(trainer._iterator(trainer.train_data, 0))
    assert len(batches) == 3  # three micro-batches accumulate into one step
    total_tokens = sum(b["loss_mask"].sum() for b in batches)
    # Megatron's DDP hooks move each .grad into .main_grad; plain backward passes accumulate there too.
    for m in trainer.model:
        m.zero_grad_buffer()
    for b in batches:
        losses = module(b["tokens"], b["position_ids"], None, labels=b["labels"])
        ((losses.float() * b["loss_mask"]).sum() / total_tokens).backward()
    for n, p in module.named_parameters():
        assert got[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], p.main_grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_non_finite_gradient_never_reaches_the_weights(trainer, monkeypatch):
    # A finite loss with an overflowing gradient (bf16 has no loss scaler to notice): the guard must act
    # before the optimizer step, in both policies.
    real_run = trainer._run

    def run_then_poison(*args, **kwargs):
        out = real_run(*args, **kwargs)
        trainer.model[0].buffers[0].grad_data[0] = float("inf")
        return out

    monkeypatch.setattr(trainer, "_run", run_then_poison)
    before = [p.detach().clone() for p in trainer.model[0].module.parameters()]
    with pytest.raises(FloatingPointError, match="gradient norm is inf at step 4"):
        trainer.train_step(3)
    monkeypatch.setattr(trainer.nan_guard, "policy", "skip")
    skipped_before = trainer.nan_guard.skipped
    metrics = trainer.train_step(3)
    assert metrics["update_skipped"] and trainer.nan_guard.skipped == skipped_before + 1
    for p, q in zip(trainer.model[0].module.parameters(), before):
        assert torch.equal(p.detach(), q)
    monkeypatch.setattr(trainer, "_run", real_run)
    assert not trainer.train_step(3)["update_skipped"]
    assert any(not torch.equal(p.detach(), q) for p, q in zip(trainer.model[0].module.parameters(), before))
