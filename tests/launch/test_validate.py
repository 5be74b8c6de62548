"""The launch validator: each bad input ends in a LaunchError (or a warning) naming the value, the limit and
the fix; production recipes take their inputs from flags or LONGGEN_* variables."""

import dataclasses

import pytest

from megatron_longgen.config import apply_overrides
from megatron_longgen.launch.inputs import FROM_COMMAND_LINE, missing_inputs, resolve_inputs
from megatron_longgen.launch.validate import LaunchError, LaunchPolicy, validate_launch
from megatron_longgen.recipes import debug_tiny, get_recipe
from tests.launch.fixtures import checkpoint_metadata, hf_tokenizer, indexed_dataset, production_env


@pytest.fixture(scope="module")
def tokenizer_32k(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("tok32k"), vocab_size=32000)


def _problems(cfg, **kw) -> list[str]:
    with pytest.raises(LaunchError) as info:
        validate_launch(cfg, **kw)
    return info.value.problems


# ----------------------------------------------------------------------------------------- inputs
def test_production_recipes_leave_their_inputs_open_and_tiny_keeps_its_corpus():
    for name in (
        "llama2_7b_128k",
        "llama2_7b_128k_full",
        "llama2_7b_128k_pi",
        "llama2_7b_128k_yarn",
        "llama2_70b_128k",
        "llama2_70b_128k_full",
    ):
        cfg = get_recipe(name)
        assert cfg.data.blend == cfg.data.corpus == cfg.data.tokenizer == FROM_COMMAND_LINE, name
        assert cfg.train.init_checkpoint == FROM_COMMAND_LINE, name
    tiny = debug_tiny()
    assert (tiny.data.corpus, tiny.data.tokenizer, tiny.train.init_checkpoint) == (
        "builtin:tiny_stories",
        "builtin:tiny_sp",
        None,
    )


def test_environment_fills_only_open_inputs_and_flags_win():
    env = {"LONGGEN_DATA_BLEND": "/d/a", "LONGGEN_TOKENIZER": "/t", "LONGGEN_INIT_CHECKPOINT": "/c"}
    cfg = resolve_inputs(get_recipe("llama2_7b_128k"), environ=env)
    assert (cfg.data.blend, cfg.data.tokenizer, cfg.train.init_checkpoint) == ("/d/a", "/t", "/c")
    cfg = resolve_inputs(
        get_recipe("llama2_7b_128k"),
        data_blend="0.5 /x 0.5 /y",
        tokenizer="/t2",
        init_checkpoint="none",
        environ=env,
    )
    assert (cfg.data.blend, cfg.data.tokenizer, cfg.train.init_checkpoint) == ("0.5 /x 0.5 /y", "/t2", None)
    tiny = resolve_inputs(debug_tiny(), environ=env)
    assert tiny == debug_tiny()  # a LONGGEN_* left in the shell never changes the tiny recipe
    assert resolve_inputs(debug_tiny(), tokenizer="/t3", environ=env).data.tokenizer == "/t3"


def test_missing_inputs_name_the_flag_and_the_variable():
    problems = _problems(get_recipe("llama2_7b_128k"), world_size=64)
    assert problems == missing_inputs(get_recipe("llama2_7b_128k"))
    assert len(problems) == 3
    for flag, var in (
        ("--data-blend", "LONGGEN_DATA_BLEND"),
        ("--tokenizer", "LONGGEN_TOKENIZER"),
        ("--init-checkpoint", "LONGGEN_INIT_CHECKPOINT"),
    ):
        assert any(flag in p and var in p and "llama2_7b_128k" in p for p in problems), (flag, problems)


def test_tokenizer_vocabulary_must_equal_the_model_s(tmp_path):
    tok = hf_tokenizer(tmp_path / "tok", vocab_size=1000)
    cfg = resolve_inputs(debug_tiny(), tokenizer=tok)
    problems = _problems(cfg, world_size=1)
    assert len(problems) == 1 and "has 1000 tokens but model.vocab_size is 1024" in problems[0]
    # The tiny tokenizer is 1,024 pieces: a model of 2,048 rows is refused too (not only larger tokenizers).
    problems = _problems(apply_overrides(debug_tiny(), ["model.vocab_size=2048"]), world_size=1)
    assert "has 1024 tokens but model.vocab_size is 2048" in problems[0]


def test_init_checkpoint_must_exist_and_hold_the_same_model(tmp_path):
    cfg = resolve_inputs(debug_tiny(), init_checkpoint=str(tmp_path / "nowhere"))
    assert "does not exist" in _problems(cfg, world_size=1)[0]
    (tmp_path / "empty").mkdir()
    cfg = resolve_inputs(debug_tiny(), init_checkpoint=str(tmp_path / "empty"))
    assert "is not a LongGen checkpoint" in _problems(cfg, world_size=1)[0]
    other = apply_overrides(
        debug_tiny(), ["model.num_layers=4", "model.layer_pattern=SFFS", "model.vocab_size=2048"]
    )
    ckpt = checkpoint_metadata(tmp_path / "ckpt", other)
    problems = _problems(resolve_inputs(debug_tiny(), init_checkpoint=ckpt), world_size=1)
    assert (
        "holds another model: num_layers 4 (run: 6)" in problems[0]
        and "vocab_size 2048 (run: 1024)" in problems[0]
    )
    same = checkpoint_metadata(tmp_path / "same", debug_tiny())
    report = validate_launch(resolve_inputs(debug_tiny(), init_checkpoint=same), world_size=1)
    assert any("shape matches" in line for line in report.lines)


# ----------------------------------------------------------------------------------------- data blend
def test_blend_smaller_than_one_sequence_is_refused(tmp_path):
    prefix = indexed_dataset(tmp_path / "small", doc_lengths=[300, 200])
    cfg = resolve_inputs(apply_overrides(debug_tiny(), ["data.valid_fraction=0"]), data_blend=prefix)
    problems = _problems(cfg, world_size=1)
    assert len(problems) == 1
    assert "has 500 training tokens (of 500" in problems[0] and "seq_length 1024 + 1" in problems[0]


def test_blend_epochs_warn_then_refuse_with_the_numbers(tmp_path):
    # 20 documents of 1,025 tokens = 20 sequences of 1,024 per epoch (valid_fraction 0).
    prefix = indexed_dataset(tmp_path / "docs", doc_lengths=[1025] * 20)
    base = resolve_inputs(apply_overrides(debug_tiny(), ["data.valid_fraction=0"]), data_blend=prefix)
    twice = apply_overrides(base, ["train.max_steps=10"])  # 10 steps x 4 sequences = 40 = 2 epochs
    report = validate_launch(twice, world_size=1)
    assert any("would be read 2.00 times" in w and "the data repeats" in w for w in report.warnings)
    assert any("20 sequences/epoch -> 2.00 epochs" in line for line in report.lines)
    ten = apply_overrides(base, ["train.max_steps=50"])  # 200 sequences = 10 epochs > 4
    problems = _problems(ten, world_size=1)
    assert "max_steps 50 x global_batch_size 4 x seq_length 1024 = 204,800 tokens" in problems[0]
    assert "10.00 times, above the limit of 4 epochs" in problems[0]
    validate_launch(ten, world_size=1, policy=LaunchPolicy(max_data_epochs=12))  # a stated, raised limit


def test_blend_file_problems_name_the_file(tmp_path):
    cfg = resolve_inputs(debug_tiny(), data_blend=str(tmp_path / "missing"))
    assert "missing.idx does not exist" in _problems(cfg, world_size=1)[0]


# ----------------------------------------------------------------------------------------- sizes and plan
def test_world_size_and_batch_errors():
    with pytest.raises(LaunchError, match="world size 0 with 8 GPUs per node: need at least one GPU"):
        validate_launch(debug_tiny(), world_size=0)
    cfg = apply_overrides(debug_tiny(), ["parallel.tensor_parallel=2"])
    assert "world size 3 must be a multiple of tp*pp*cp = 2*1*1 = 2" in _problems(cfg, world_size=3)[0]
    problems = _problems(debug_tiny(), world_size=3)
    assert "global_batch_size 4 must be a multiple of micro_batch_size * dp = 2 * 3 on 3 GPUs" in problems[0]


def test_predicted_out_of_memory_names_the_planner_s_layout():
    cfg = apply_overrides(
        get_recipe("llama2_7b_128k"),
        ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "train.recompute=none"],
    )
    problems = _problems(cfg, world_size=32, gpu="h100-80gb", check_files=False)
    memory = [p for p in problems if "predicted peak memory" in p]
    assert len(memory) == 1 and "usable on a NVIDIA H100 SXM5 80GB" in memory[0]
    assert "the planner's best layout that fits is tp" in memory[0]
    assert "tools/plan_parallelism.py --recipe llama2_7b_128k --gpus 32 --gpu h100-80gb" in memory[0]
    # Downgraded to a warning on request (policy), e.g. for a GPU whose memory the table misjudges.
    inputs_given = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, blend="/x", tokenizer="/t"),
        train=dataclasses.replace(cfg.train, init_checkpoint="/c"),
    )
    report = validate_launch(
        inputs_given,
        world_size=32,
        gpu="h100-80gb",
        check_files=False,
        policy=LaunchPolicy(memory_check="warn"),
    )
    assert any("predicted peak memory" in w for w in report.warnings)


def test_production_launch_passes_with_a_save_time_warning(tmp_path):
    cfg = get_recipe("llama2_70b_128k")
    env = production_env(tmp_path, cfg, tokens=5_100_000_000)
    run = resolve_inputs(cfg, environ=env)
    report = validate_launch(run, world_size=64, gpu="h100-80gb")
    text = report.format()
    assert "world 64 = tp 8 x pp 1 x cp 8 x dp 1" in text
    assert "tokenizer " + env["LONGGEN_TOKENIZER"] + ": 32000 tokens (= model.vocab_size)" in text
    assert "0.99 epochs over the run" in text and "shape matches the run" in text
    assert "plan on NVIDIA H100 SXM5 80GB" in text and "tokens/s/GPU" in text
    assert any("more than the signal lead time of 180 s" in w for w in report.warnings)
    quiet = validate_launch(run, world_size=64, gpu="h100-80gb", policy=LaunchPolicy(signal_lead_s=600))
    assert not any("signal lead time" in w for w in quiet.warnings)


def test_trainer_start_up_call_reads_the_job_from_the_environment():
    from megatron_longgen.launch.validate import job_size_from_env, policy_from_env, validate_launch_from_env

    assert job_size_from_env({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == (16, 8)
    assert job_size_from_env({"SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8(x4)"}) == (32, 8)
    assert job_size_from_env({}) == (1, 1)
    policy = policy_from_env({"LONGGEN_SIGNAL_LEAD_S": "300", "LONGGEN_MEMORY_CHECK": "warn"})
    assert policy == LaunchPolicy(signal_lead_s=300, memory_check="warn")
    with pytest.raises(LaunchError, match="LONGGEN_SIGNAL_LEAD_S must be a number, got 'soon'"):
        policy_from_env({"LONGGEN_SIGNAL_LEAD_S": "soon"})
    with pytest.raises(LaunchError, match="memory_check must be error, warn or off, got 'maybe'"):
        policy_from_env({"LONGGEN_MEMORY_CHECK": "maybe"})
    report = validate_launch_from_env(debug_tiny(), environ={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in report.lines
    with pytest.raises(
        LaunchError, match="global_batch_size 4 must be a multiple of micro_batch_size \\* dp = 2 \\* 4"
    ):
        validate_launch_from_env(debug_tiny(), environ={"WORLD_SIZE": "4"})
