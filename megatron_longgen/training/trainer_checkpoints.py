"""The Trainer's checkpoint methods: publish a resumable checkpoint (`start_save` / `save`) and restore one
(`restore`: the newest intact checkpoint of the run after `resume_check.py`'s comparison, or the initial
weights of `train.init_checkpoint`). A mixin of `trainer.Trainer`, which provides `cfg`, `model`,
`optimizer`, `scheduler`, `tokenizer`, `nan_guard`, `run_dir`, `_say` and `_warn`.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist


class TrainerCheckpoints:
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def signatures(self) -> dict:
        from megatron_longgen.training.resume_check import data_signature, tokenizer_signature

        if not hasattr(self, "_signatures"):
            self._signatures = {
                "tokenizer": tokenizer_signature(self.tokenizer),
                "data": data_signature(self.cfg),
            }
        return self._signatures

    def saver(self):
        """The run's CheckpointSaver (background saves where supported, `train.async_save`)."""
        from megatron_longgen.training.checkpointing import CheckpointSaver

        if getattr(self, "_saver", None) is None:
            self._saver = CheckpointSaver(
                self.checkpoints_dir,
                async_save=self.cfg.train.async_save,
                keep_last=self.cfg.train.keep_last_checkpoints,
            )
        return self._saver

    def start_save(self, step: int, *, clock=None):
        """Collective: start publishing a resumable checkpoint after `step` completed steps (in the
        background where supported); returns its SaveResult (`path`, timings; `done` once published)."""
        extra = {"nan_skips": self.nan_guard.skipped, "signatures": self.signatures()}
        if clock is not None:
            extra["clock"] = clock.state_dict()
        return self.saver().save(
            step=step,
            cfg=self.cfg,
            model_chunks=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra_state=extra,
        )

    def save(self, step: int, *, clock=None) -> Path:
        """Collective: publish a resumable checkpoint after `step` completed steps and wait for it."""
        result = self.start_save(step, clock=clock)
        self.saver().finalize_all()
        return result.path

    def restore(self, *, resume: bool, allow_changes: tuple[str, ...] = ()) -> tuple[int, dict]:
        """Collective: (step to start from, the checkpoint's trainer state or {}). With `resume`, the latest
        complete checkpoint of this run, after checking it belongs to the same run (`resume_check.py`);
        otherwise, or when there is none, `train.init_checkpoint`'s weights when set; else step 0."""
        from megatron_longgen.checkpoint.format import load_config
        from megatron_longgen.training.checkpointing import (
            load_model_weights,
            load_training_checkpoint,
            read_trainer_state,
            select_resume_checkpoint,
        )
        from megatron_longgen.training.resume_check import compare_for_resume, enforce

        # The newest checkpoint that passes its manifest (a damaged newer one is skipped with a warning).
        latest = (
            select_resume_checkpoint(self.checkpoints_dir, group=dist.group.WORLD, warn=self._warn)
            if resume
            else None
        )
        if latest is not None:
            saved_state = read_trainer_state(latest)
            diff = compare_for_resume(
                load_config(latest),
                self.cfg,
                saved_signatures=saved_state.get("signatures"),
                current_signatures=self.signatures(),
            )
            for note in enforce(diff, checkpoint=latest, allowed=allow_changes):
                self._say(note)
            state = load_training_checkpoint(
                latest,
                model_chunks=self.model,
                optimizer=self.optimizer,
                scheduler=None if diff.schedule else self.scheduler,
            )
            step = int(state["step"])
            if diff.schedule:  # the new schedule, at the resumed step
                self.scheduler.num_steps = step
                self.scheduler.step(increment=0)
            self.nan_guard.skipped = int(state.get("nan_skips", 0))
            self._say(f"resumed from {latest} at step {step}")
            return step, state
        init = self.cfg.train.init_checkpoint
        if init:
            src = load_model_weights(init, model_chunks=self.model)
            if (
                src.model.num_layers != self.cfg.model.num_layers
                or src.model.hidden_size != self.cfg.model.hidden_size
            ):
                raise ValueError(
                    f"init_checkpoint {init} has {src.model.num_layers} layers of width {src.model.hidden_size}; "
                    f"the run has {self.cfg.model.num_layers} of width {self.cfg.model.hidden_size}"
                )
            # The optimizer's fp32 main params were copied from the random init; refresh them.
            self.optimizer.reload_model_params()
            self._say(f"initialised weights from {init}")
        elif resume:
            self._say(f"--resume: no checkpoint in {self.checkpoints_dir}; starting from scratch")
        return 0, {}
