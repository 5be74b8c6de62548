"""Corrupt checkpoints are found, named and skipped: manifests (sizes, checksums, written last), the
fallback to the newest intact checkpoint, a `latest` that names a missing folder, checkpoints written
before manifests existed, and the error when nothing is intact.

Two gloo ranks (tensor parallel) save three checkpoints once for the module, so every
checkpoint holds files written by both ranks; the corruption cases then run on copies in this process.
The oracle for "intact" is the bytes each rank wrote (the manifest is compared with an independent
re-hash), and for "resumed the right one" the parameters recorded at each save.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest

from megatron_longgen.training.checkpointing.manifest import (
    CorruptCheckpointError,
    NoIntactCheckpointError,
    find_resumable_checkpoint,
    select_resume_checkpoint,
    verify_checkpoint,
)
from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

STEPS = (2, 3, 4)


def _params(trainer) -> dict:
    module = trainer.model[0].module
    return {name: p.detach().float().numpy().copy() for name, p in module.named_parameters()}


def _worker(rank, world_size, root):
    import torch.distributed as dist

    from megatron_longgen.checkpoint.format import model_dir
    from megatron_longgen.training.checkpointing import CheckpointSaver, load_training_checkpoint
    from megatron_longgen.training.trainer import Trainer

    root = Path(root)
    # TP=2: each rank writes its own tensor shards (at DP=2 the main replicas all live on rank 0).
    cfg = tiny_config("train.max_steps=10", "train.save_on_exit=false", "parallel.tensor_parallel=2")
    trainer = Trainer(cfg, run_dir=root / "run", quiet=True)
    saver = CheckpointSaver(root / "ckpts", async_save=False)
    snapshots, out = {}, {}
    for step in range(max(STEPS)):
        trainer.train_step(step)
        if step + 1 in STEPS:
            result = saver.save(
                step=step + 1,
                cfg=cfg,
                model_chunks=trainer.model,
                optimizer=trainer.optimizer,
                scheduler=trainer.scheduler,
            )
            snapshots[step + 1] = _params(trainer)
            out[f"result_{step + 1}"] = (result.done, result.num_bytes, result.path.name)
    group = dist.group.WORLD

    # The newest checkpoint loses the tail of a file written by rank 1: both ranks verify their share of
    # the files in parallel, agree that step 4 is corrupt, and resume from step 3.
    work = root / "work"
    dist.barrier()
    if rank == 0:
        shutil.copytree(root / "ckpts", root / "pristine")
        victim = min((root / "ckpts" / "step_0000004" / "optim").glob("__1_*.distcp"))
        out["victim"] = victim.relative_to(root / "ckpts" / "step_0000004").as_posix()
        data = victim.read_bytes()
        victim.write_bytes(data[:-100])
    dist.barrier()
    warnings = []
    chosen = select_resume_checkpoint(root / "ckpts", group=group, warn=warnings.append)
    out["chosen"] = chosen.name
    out["warnings"] = warnings
    trainer.train_step(max(STEPS))  # move the weights away from every snapshot
    state = load_training_checkpoint(
        chosen, model_chunks=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler
    )
    loaded = _params(trainer)
    out["resumed_step"] = state["step"]
    out["resumed_matches_step_3"] = all((loaded[k] == snapshots[3][k]).all() for k in loaded)

    # Garbage at the start of a tensor file (same size, so only a checksum sees it): with checksums off
    # the verification passes, and loading names the part instead of "invalid load key".
    if rank == 0:
        shutil.copytree(root / "ckpts" / "step_0000003", work)
        target = min(model_dir(work).glob("__0_*.distcp"))
        data = bytearray(target.read_bytes())
        data[:64] = b"\xff" * 64
        target.write_bytes(bytes(data))
    dist.barrier()
    verify_checkpoint(work, checksums=False, group=group)
    try:
        load_training_checkpoint(work, model_chunks=trainer.model, optimizer=trainer.optimizer)
        out["garbage_load_error"] = None
    except CorruptCheckpointError as err:
        out["garbage_load_error"] = str(err)
    out["work"] = str(work)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three checkpoints (steps 2, 3, 4) of a 2-rank run (`pristine/`, as saved), and the workers' results."""
    root = tmp_path_factory.mktemp("integrity")
    results = run_distributed(_worker, world_size=2, args=(str(root),), timeout_s=300)
    return root, results


@pytest.fixture
def ckpts(saved, tmp_path) -> Path:
    """A private copy of the pristine checkpoints."""
    root, _ = saved
    shutil.copytree(root / "pristine", tmp_path / "ckpts")
    return tmp_path / "ckpts"


# ----------------------------------------------------------------------------------- the saved run


def test_every_file_is_in_the_manifest_with_its_size_and_checksum(saved):
    root, _ = saved
    folder = root / "pristine" / "step_0000003"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    # Files of both ranks: the per-rank hashing covered rank 1's files too.
    assert any("/__1_" in name for name in on_disk) and "rng/rank_00001.pt" in on_disk
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry["size"] == len(data)
        algorithm, digest = entry["checksum"].split(":")
        if algorithm == "crc32":  # independent re-hash (xxhash: compare with the library directly)
            assert digest == f"{zlib.crc32(data):08x}"
        else:
            import xxhash

            assert digest == xxhash.xxh3_64(data).hexdigest()
    assert manifest["total_bytes"] == sum(e["size"] for e in manifest["files"].values())


def test_save_results_report_the_published_size(saved):
    root, results = saved
    for step in STEPS:
        done, num_bytes, name = results[0][f"result_{step}"]
        assert done and name == f"step_{step:07d}"
        assert (
            num_bytes == json.loads((root / "pristine" / name / "manifest.json").read_text())["total_bytes"]
        )


def test_truncated_file_of_rank_1_is_found_in_parallel_and_resume_falls_back(saved):
    _, results = saved
    for out in results:  # both ranks reach the same verdict
        assert out["chosen"] == "step_0000003"
        assert out["resumed_step"] == 3 and out["resumed_matches_step_3"]
    assert len(results[0]["warnings"]) == 1
    warning = results[0]["warnings"][0]
    assert "step_0000004" in warning and results[0]["victim"] in warning
    assert "truncated" in warning and "resuming from" in warning and "step_0000003" in warning


def test_garbage_in_a_tensor_file_is_named_when_loading(saved):
    _, results = saved
    for out in results:
        assert out["garbage_load_error"] is not None, "loading garbage did not fail"
        assert f"{out['work']}/model: cannot be loaded (CheckpointException" not in out["garbage_load_error"]
        assert out["garbage_load_error"].startswith(
            f"checkpoint {out['work']} is not usable: {out['work']}/model: cannot be loaded ("
        )
        assert "UnpicklingError: invalid load key" in out["garbage_load_error"]
        assert "\n" not in out["garbage_load_error"], "one line, not the ranks' tracebacks"


# ------------------------------------------------------------------------------- corruption cases


def _resume(ckpts: Path):
    path, skipped = find_resumable_checkpoint(ckpts)
    return (path.name if path else None), [(p.name, reason) for p, reason in skipped]


def test_intact_copy_resumes_from_the_newest(ckpts):
    assert _resume(ckpts) == ("step_0000004", [])


def test_truncated_distcp(ckpts):
    victim = min((ckpts / "step_0000004" / "model").glob("*.distcp"))
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000003"
    assert skipped == [
        (
            "step_0000004",
            (
                f"model/{victim.name}: has {size // 2} bytes, the manifest records {size} "
                "(truncated or overwritten)"
            ),
        )
    ]


def test_garbage_in_a_pt_file_is_a_checksum_mismatch(ckpts):
    victim = ckpts / "step_0000004" / "rng" / "rank_00001.pt"
    victim.write_bytes(b"\x00garbage" * (victim.stat().st_size // 8) + b"\x00" * (victim.stat().st_size % 8))
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000003"
    assert skipped[0][0] == "step_0000004"
    assert skipped[0][1].startswith("rng/rank_00001.pt: checksum ") and "corrupted" in skipped[0][1]
    # Sizes alone cannot see it: the documented escape hatch for huge checkpoints trades this away.
    path, skipped = find_resumable_checkpoint(ckpts, checksums=False)
    assert path.name == "step_0000004" and skipped == []


@pytest.mark.parametrize("name", ["trainer_state.json", "longgen_config.json"])
def test_bad_json(ckpts, name):
    path = ckpts / "step_0000004" / name
    path.write_text(path.read_text()[:-40])
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000003"
    assert skipped[0][0] == "step_0000004" and skipped[0][1].startswith(f"{name}: is not valid JSON")


def test_missing_file(ckpts):
    victim = min((ckpts / "step_0000004" / "optim").glob("__1_*.distcp"))
    victim.unlink()
    assert _resume(ckpts) == ("step_0000003", [("step_0000004", f"optim/{victim.name}: is missing")])


def test_manifest_mismatch(ckpts):
    path = ckpts / "step_0000004" / "manifest.json"
    manifest = json.loads(path.read_text())
    # model/metadata.json exists in every Megatron-Core version (0.19 has no model/common.pt).
    manifest["files"]["model/metadata.json"]["size"] += 1
    path.write_text(json.dumps(manifest))
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000003"
    assert skipped[0][1].startswith("model/metadata.json: has ") and "the manifest records" in skipped[0][1]


def test_missing_or_garbled_manifest(ckpts):
    (ckpts / "step_0000004" / "manifest.json").unlink()
    (ckpts / "step_0000003" / "manifest.json").write_text("{not json")
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000002"
    assert skipped[0] == ("step_0000004", "manifest.json: is missing")
    assert skipped[1][0] == "step_0000003" and skipped[1][1].startswith("manifest.json: is not valid JSON")


def test_latest_names_a_folder_that_no_longer_exists(ckpts):
    (ckpts / "latest").write_text("step_0000009\n")
    chosen, skipped = _resume(ckpts)
    assert chosen == "step_0000004"
    assert skipped == [("step_0000009", "named by `latest`, but the folder does not exist")]


def test_latest_lagging_behind_a_published_checkpoint(ckpts):
    # A crash between the rename of step 4 and the rewrite of `latest`: step 4 is complete and wins.
    (ckpts / "latest").write_text("step_0000003\n")
    assert _resume(ckpts) == ("step_0000004", [])


def test_unfinished_save_is_ignored(ckpts):
    shutil.copytree(ckpts / "step_0000004", ckpts / ".tmp_step_0000005")
    (ckpts / ".tmp_step_0000005" / "manifest.json").unlink()
    assert _resume(ckpts) == ("step_0000004", [])


def test_nothing_intact_refuses_with_every_reason(ckpts):
    for step in STEPS:
        (ckpts / f"step_{step:07d}" / "trainer_state.json").write_text("")
    with pytest.raises(NoIntactCheckpointError) as info:
        select_resume_checkpoint(ckpts, warn=lambda text: None)
    message = str(info.value)
    assert message.startswith(
        f"checkpoint {ckpts} is not usable: {ckpts}: no intact checkpoint to resume from"
    )
    for step in STEPS:
        assert f"step_{step:07d}: trainer_state.json: is not valid JSON" in message
    assert "--overwrite (the old run is moved aside) or another --run-dir" in message


def test_empty_run_is_a_fresh_start(tmp_path):
    assert select_resume_checkpoint(tmp_path / "none") is None
    assert find_resumable_checkpoint(tmp_path) == (None, [])


def test_checkpoint_written_before_manifests(ckpts):
    """No manifest and no `manifest` field: structural checks only, which still catch truncation."""
    for step in STEPS:
        folder = ckpts / f"step_{step:07d}"
        (folder / "manifest.json").unlink()
        state = json.loads((folder / "trainer_state.json").read_text())
        del state["manifest"]
        (folder / "trainer_state.json").write_text(json.dumps(state))
    verify_checkpoint(ckpts / "step_0000004")
    victim = max((ckpts / "step_0000004" / "optim").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"optim/{victim.name}: has \d+ bytes but optim/.metadata "
        r"places data up to byte \d+ \(truncated\)",
    ):
        verify_checkpoint(ckpts / "step_0000004")
    assert _resume(ckpts)[0] == "step_0000003"


def test_error_names_checkpoint_file_and_reason(ckpts):
    (ckpts / "step_0000004" / "model" / "metadata.json").unlink()
    with pytest.raises(CorruptCheckpointError) as info:
        verify_checkpoint(ckpts / "step_0000004")
    err = info.value
    assert (err.path, err.file, err.reason) == (ckpts / "step_0000004", "model/metadata.json", "is missing")
    assert str(err) == (
        f"checkpoint {ckpts / 'step_0000004'} is not usable: "
        f"{ckpts / 'step_0000004' / 'model' / 'metadata.json'}: is missing"
    )
