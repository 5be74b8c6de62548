"""On a GPU: the planner's memory and step time against real training steps of the 7B-shaped bench model.

python -m pytest tests/launch/test_gpu_plan.py -m gpu -q
"""

import statistics
import tempfile
import time

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("pattern", ["SFFS", "FFFF"])
def test_planner_predicts_a_real_step(pattern, recompute):
    import torch

    from megatron_longgen.launch.gpus import detect_gpu
    from megatron_longgen.launch.layout import Layout
    from megatron_longgen.launch.memory import estimate_memory
    from megatron_longgen.launch.timing import estimate_step_time
    from megatron_longgen.launch.validation import bench_model_config
    from megatron_longgen.training.trainer import Trainer
    from megatron_longgen.utils.distributed import destroy

    gpu = detect_gpu()
    if gpu is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in launch/gpus.py")
    cfg = bench_model_config(
        pattern=pattern, seq_length=16384, recompute=recompute, variant="sink_window", backend="auto"
    )
    layout = Layout(tp=1, pp=1, cp=1, dp=1, recompute=recompute, sequence_parallel=False)
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Earlier tests in this process may still hold memory (Megatron's globals keep some alive): measure what
    # this run adds on top.
    base = torch.cuda.memory_allocated()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, run_dir=run_dir, quiet=True)
            times = []
            for step in range(4):
                torch.cuda.synchronize()
                start = time.perf_counter()
                trainer.train_step(step)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            del trainer
    finally:
        destroy()
    measured_mem = torch.cuda.max_memory_allocated() - base
    predicted_mem = estimate_memory(cfg, layout).peak_bytes
    assert predicted_mem == pytest.approx(measured_mem, rel=0.10)
    measured_step = statistics.median(times[1:])
    predicted_step = estimate_step_time(cfg, layout, gpu).total
    # 16K steps are short (~0.3 s): launch overheads weigh more than at 128K, hence 30% rather than 20%.
    assert predicted_step == pytest.approx(measured_step, rel=0.30)
