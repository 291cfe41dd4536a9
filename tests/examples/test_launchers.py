"""The cluster launchers (examples/idefics2/*.sh, slurm/idefics2.sbatch) in DRY_RUN mode: the torchrun
command they print, its entry-point flags parsed by the real parser, and their one-line input checks."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_patch.training.arguments import build_parser

pytestmark = pytest.mark.unit


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "idefics2"
ENTRY = EXAMPLES / "pretrain_megatron_idefics2.py"
PRETRAIN = ["pretrain_idefics2.sh", "pretrain_idefics2_llama3.sh"]
FINETUNE = ["finetune_idefics2.sh", "finetune_idefics2_llama3.sh"]
# Settings the environment of a caller may carry: cleared so only the test's values count.
SETTINGS = """NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE TP PP SP MBS GBS SEQ_LEN TRAIN_ITERS LR MIN_LR
    WARMUP_ITERS LR_DECAY_STYLE LR_DECAY_ITERS LOAD SAVE SAVE_INTERVAL FINETUNE AUTO_RESUME DATA_PATH VALID_DATA_PATH
    EVAL_INTERVAL EVAL_ITERS NUM_WORKERS FREEZE ANSWER_LOSS_ONLY DIST_FLAGS LOG_INTERVAL TENSORBOARD_DIR SCRIPT
    REPO OVERLAP CUDA_DEVICE_MAX_CONNECTIONS EXIT_SIGNAL SAVE_TOTAL_LIMIT ASYNC_SAVE LORA_RANK LORA_ALPHA LORA_DROPOUT
    LORA_TARGETS LORA_MODULES_TO_SAVE LORA_LOAD""".split()


@pytest.fixture
def paths(tmp_path):
    """A fake but existing checkpoint (tracker file only) and shard folders."""
    load = tmp_path / "mcore"
    load.mkdir()
    (load / "latest_checkpointed_iteration.txt").write_text("release")
    for name in ("train", "valid"):
        (tmp_path / name).mkdir()
    return {"LOAD": str(load), "SAVE": str(tmp_path / "save"), "DATA_PATH": str(tmp_path / "train")}


def run(script, paths, *args, path_prefix=None, **env):
    full = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
    full.update({"DRY_RUN": "1", **paths, **{k: str(v) for k, v in env.items()}})
    if path_prefix:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    target = EXAMPLES / script
    return subprocess.run(["bash", str(target), *args], capture_output=True, text=True, env=full, timeout=60)


def commands(result) -> list[tuple[dict, list]]:
    """(torchrun flags, entry-point flags) of each printed torchrun command."""
    assert result.returncode == 0, result.stderr
    found = []
    for line in result.stdout.splitlines():
        if not line.startswith("torchrun "):
            continue
        words = shlex.split(line)
        at = words.index(str(ENTRY))
        launcher = words[1:at]
        assert len(launcher) in (10, 12), launcher  # 12: --signals-to-handle (EXIT_SIGNAL)
        found.append((dict(zip(launcher[::2], launcher[1::2])), words[at + 1:]))
    assert found, result.stdout
    return found


def dry(script, paths, *args, **env):
    ((launcher, flags),) = commands(run(script, paths, *args, **env))
    return launcher, build_parser().parse_args(flags)


@pytest.mark.parametrize("script", PRETRAIN + FINETUNE)
def test_dry_run_prints_a_torchrun_command_the_entry_point_parses(script, paths):
    launcher, args = dry(script, paths, NNODES=2, NODE_RANK=1, MASTER_ADDR="node0", MASTER_PORT=1234,
                         GPUS_PER_NODE=4, TP=2, PP=2, MBS=1, GBS=16, TRAIN_ITERS=10, LR=1e-4)
    assert launcher == {"--nnodes": "2", "--nproc-per-node": "4", "--node-rank": "1",
                        "--master-addr": "node0", "--master-port": "1234"}
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.micro_batch_size, args.global_batch_size, args.train_iters, args.lr) == (1, 16, 10, 1e-4)
    assert args.lr_decay_iters == 10 and args.lr_decay_style == "cosine"
    assert (args.load, args.save, args.data_path) == (paths["LOAD"], paths["SAVE"], [paths["DATA_PATH"]])
    assert args.bf16 and args.use_distributed_optimizer and args.accumulate_allreduce_grads_in_fp32
    assert args.sequence_parallel and args.save_interval
    assert args.overlap_grad_reduce and args.overlap_param_gather  # with the distributed optimizer
    assert args.valid_data_path is None and args.eval_interval is None  # no validation set given
    assert args.tensorboard_dir is None  # opt-in: tensorboard is not a dependency
    if script in PRETRAIN:
        assert args.freeze_llm and args.freeze_clip_vision_tower and not args.freeze_perceiver
        assert not args.answer_loss_only and not args.finetune
    else:
        assert not (args.freeze_llm or args.freeze_clip_vision_tower or args.freeze_perceiver)
        assert args.answer_loss_only and args.finetune


def test_llama3_variants_differ_in_defaults_only(paths):
    for mistral, llama3 in zip(PRETRAIN[:1] + FINETUNE[:1], PRETRAIN[1:] + FINETUNE[1:]):
        a, b = vars(dry(mistral, paths)[1]), vars(dry(llama3, paths)[1])
        assert a["seq_length"] == 2048 and b["seq_length"] == 4096
        differ = {k for k in a if a[k] != b[k]}
        assert differ <= {"seq_length", "lr", "min_lr", "micro_batch_size"}, differ


def test_validation_set_extra_flags_and_overrides(paths, tmp_path):
    valid = str(tmp_path / "valid")
    blend = f"0.7 {paths['DATA_PATH']} 0.3 {valid}"
    _, args = dry("finetune_idefics2.sh", {**paths, "DATA_PATH": blend}, "--eval-iters", "3", "--seed", "7",
                  VALID_DATA_PATH=valid, EVAL_INTERVAL=50, FREEZE="--freeze-clip-vision-tower", ANSWER_LOSS_ONLY=0,
                  TP=1, PP=4, GPUS_PER_NODE=4, GBS=8, DIST_FLAGS="", TENSORBOARD_DIR=tmp_path / "tb")
    assert args.data_path == blend.split() and args.valid_data_path == [valid] and args.eval_interval == 50
    assert (args.eval_iters, args.seed, args.tensorboard_dir) == (3, 7, str(tmp_path / "tb"))
    assert args.freeze_clip_vision_tower and not args.freeze_llm and not args.answer_loss_only
    assert not args.sequence_parallel and not args.bf16 and not args.use_distributed_optimizer
    assert args.overlap_grad_reduce and not args.overlap_param_gather  # no distributed optimizer: no gather


def test_overlap_can_be_turned_off(paths):
    _, args = dry("pretrain_idefics2.sh", paths, OVERLAP=0)
    assert args.use_distributed_optimizer and not (args.overlap_grad_reduce or args.overlap_param_gather)


def test_async_save_and_retention_reach_the_entry_point(paths):
    _, args = dry("pretrain_idefics2.sh", paths, ASYNC_SAVE=1, SAVE_TOTAL_LIMIT=3)
    assert args.async_save and args.save_total_limit == 3
    _, args = dry("pretrain_idefics2.sh", paths)
    assert not args.async_save and args.save_total_limit is None


def test_lora_settings_reach_the_entry_point_and_a_resume_drops_lora_load(paths, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    _, args = dry("finetune_idefics2.sh", paths, LORA_RANK=16, LORA_ALPHA=32, LORA_DROPOUT=0.05,
                  LORA_TARGETS="q_proj,v_proj,vision_model", LORA_MODULES_TO_SAVE="connector", LORA_LOAD=adapter)
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout) == (16, 32.0, 0.05)
    assert args.lora_target_modules == "q_proj,v_proj,vision_model" and args.lora_load == str(adapter)
    assert args.lora_modules_to_save == "connector"
    _, args = dry("finetune_idefics2.sh", paths)
    assert args.lora_rank is None and args.lora_load is None
    save = Path(paths["SAVE"])
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("10")
    _, args = dry("finetune_idefics2.sh", paths, LORA_RANK=16, LORA_LOAD=adapter)  # AUTO_RESUME: LOAD=SAVE
    assert args.load == paths["SAVE"] and args.lora_load is None and not args.finetune
    bad = run("finetune_idefics2.sh", {**paths, "SAVE": str(tmp_path / "fresh")}, LORA_RANK=16, LORA_LOAD=tmp_path)
    assert bad.returncode == 1 and "LORA_LOAD=" in bad.stderr and "adapter_config.json" in bad.stderr


def test_torchrun_runs_with_one_cuda_connection(paths, tmp_path):
    """Not a dry run: a stand-in torchrun reports the environment the launcher gave it."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "torchrun", 'echo "torchrun saw CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"\n')
    for env, want in (({}, "1"), ({"CUDA_DEVICE_MAX_CONNECTIONS": 4}, "4")):  # a caller's own value is kept
        result = run("pretrain_idefics2.sh", paths, path_prefix=stubs, DRY_RUN=0, **env)
        assert result.returncode == 0, result.stderr
        assert f"torchrun saw CUDA_DEVICE_MAX_CONNECTIONS={want}" in result.stdout, result.stdout


def test_dataset_urls_pass_through_and_pipe_is_refused(paths):
    blend = f"0.5 {paths['DATA_PATH']} 0.5 s3://bucket/shards"
    _, args = dry("pretrain_idefics2.sh", {**paths, "DATA_PATH": blend})
    assert args.data_path == blend.split()
    result = run("pretrain_idefics2.sh", {**paths, "DATA_PATH": "pipe:cat /data/{name}"})
    assert result.returncode != 0 and "pass --data-path to the entry point directly" in result.stderr


def test_a_save_with_a_checkpoint_is_resumed(paths):
    save = Path(paths["SAVE"])
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("100")
    _, args = dry("finetune_idefics2.sh", paths)
    assert args.load == str(save) and not args.finetune
    _, args = dry("finetune_idefics2.sh", paths, AUTO_RESUME=0)
    assert args.load == paths["LOAD"] and args.finetune


@pytest.mark.parametrize("env, words", [
    ({"LOAD": "/nonexistent/ckpt"}, "LOAD=/nonexistent/ckpt does not exist"),
    ({"DATA_PATH": "/nonexistent/shards"}, "DATA_PATH: shard folder /nonexistent/shards does not exist"),
    ({"TP": 3, "PP": 1}, "TP*PP=3 does not divide NNODES*GPUS_PER_NODE=8"),
    ({"GBS": 3, "MBS": 1}, "GBS=3 is not divisible by MBS*DP=1*2=2"),
    ({"NODE_RANK": 1}, "NODE_RANK=1 must be in [0, NNODES=1)"),
    ({"TRAIN_ITERS": "many"}, "TRAIN_ITERS=many must be a positive integer"),
])
def test_bad_inputs_fail_with_one_line(paths, env, words):
    result = run("pretrain_idefics2.sh", {**paths, **{k: str(v) for k, v in env.items() if k in paths}},
                 **{k: v for k, v in env.items() if k not in paths})
    assert result.returncode != 0 and "torchrun" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_idefics2.sh: error: ") and words in lines[0], lines


def test_tracker_less_load_is_refused(paths, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("pretrain_idefics2.sh", {**paths, "LOAD": str(empty)})
    assert result.returncode != 0 and "holds no checkpoint" in result.stderr


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_sbatch_runs_one_launcher_per_node(paths, tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "scontrol", '[[ "$*" == "show hostnames gpu[07-08]" ]] && printf "gpu07\\ngpu08\\n"\n')
    # srun: note its own options, then start the command once per node with that node's SLURM_NODEID.
    _stub(stubs, "srun", f'while [[ "$1" == -* ]]; do echo "$1" >> {tmp_path}/srun.txt; shift; done\n'
                         'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    result = run("slurm/idefics2.sbatch", paths, "--seed", "3", path_prefix=stubs, SCRIPT="finetune_idefics2.sh",
                 SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES=2, SLURM_GPUS_ON_NODE=4, SLURM_CPUS_PER_TASK=48,
                 SLURM_SUBMIT_DIR=REPO)
    found = commands(result)
    assert [launcher["--node-rank"] for launcher, _ in found] == ["0", "1"]
    for launcher, flags in found:
        assert {k: launcher[k] for k in ("--nnodes", "--nproc-per-node", "--master-addr")} == \
            {"--nnodes": "2", "--nproc-per-node": "4", "--master-addr": "gpu07"}
        args = build_parser().parse_args(flags)
        assert args.answer_loss_only and args.finetune and args.seed == 3
        # preemption: the workers save on SIGUSR1, torchrun leaves it to them (docs/training.md)
        assert args.exit_signal_handler and args.exit_signal == "SIGUSR1"
        assert launcher["--signals-to-handle"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    srun_options = (tmp_path / "srun.txt").read_text().split()
    assert "--ntasks-per-node=1" in srun_options and "--cpus-per-task=48" in srun_options
    (tmp_path / "srun.txt").unlink()
    commands(run("slurm/idefics2.sbatch", paths, path_prefix=stubs, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES=2,
                 SLURM_SUBMIT_DIR=REPO))  # no --cpus-per-task in the allocation: srun is given none
    assert not any(o.startswith("--cpus-per-task") for o in (tmp_path / "srun.txt").read_text().split())
    bad = run("slurm/idefics2.sbatch", paths, path_prefix=stubs, SCRIPT="nope.sh", SLURM_JOB_NODELIST="x",
              SLURM_NNODES=1, SLURM_SUBMIT_DIR=REPO)
    assert bad.returncode != 0 and "no launcher" in bad.stderr
    outside = run("slurm/idefics2.sbatch", paths, path_prefix=stubs, SLURM_SUBMIT_DIR=REPO)
    assert outside.returncode != 0 and "not inside a SLURM job" in outside.stderr
