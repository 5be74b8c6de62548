"""NaN policy and preemption flag (no process group needed)."""

import math
import os
import signal

import pytest

from megatron_longgen.training.guards import NanGuard, PreemptionFlag


def test_nan_guard_stop_names_the_step():
    guard = NanGuard(policy="stop", max_skips=3)
    assert guard.check(1.5, step=1)
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        guard.check(math.nan, step=7)


def test_nan_guard_skip_counts_then_stops():
    guard = NanGuard(policy="skip", max_skips=2)
    assert guard.check(math.inf, step=1) is False
    assert guard.check(2.0, step=2) is True
    assert guard.check(math.nan, step=3) is False
    assert guard.skipped == 2
    with pytest.raises(
        FloatingPointError, match="3 non-finite steps skipped, more than train.max_nan_skips=2"
    ):
        guard.check(math.nan, step=4)
    with pytest.raises(ValueError, match="'ignore'"):
        NanGuard(policy="ignore", max_skips=0)


def test_preemption_flag_sets_on_sigusr1_and_restores_handler():
    import torch

    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag()
    try:
        assert not flag.should_stop(device=torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received == signal.SIGUSR1
        assert flag.should_stop(device=torch.device("cpu"))
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
