"""The launcher as users type it, from a fresh clone.

``bash examples/pretrain_simpo.sh`` with no arguments is the README's main job: it
preprocesses the embedded example data, trains the tiny model on 2 processes with TP=2, and
ends by printing where its checkpoint and metrics are. ``torchrun ... examples/pretrain_simpo.sh``
runs the same file as Python on every rank.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed tree, with the C++ extension that `make setup` builds."""
    import simpo_megatron._pair_builder as ext

    path = tmp_path_factory.mktemp("clone") / "simpo-megatron"
    subprocess.run(["git", "clone", "-q", REPO, str(path)], check=True)
    shutil.copy(ext.__file__, path / "simpo_megatron")
    return path


def test_default_run_from_fresh_clone(clone, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "examples/pretrain_simpo.sh"],
        cwd=clone,
        env=_clean_env(OUTPUT_DIR=str(out)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"saved checkpoint {out}/iter_0000100" in proc.stdout
    assert f"metrics: {out}/metrics.jsonl" in proc.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "100"

    train = IndexedDataset(str(clone / "examples" / "data" / "train_pairs"))
    assert len(train.document_indices) - 1 == 4000 and len(train) == 3 * 4000

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    valid = {r["iteration"]: r for r in records if r["split"] == "valid"}
    assert valid[0]["rewards/accuracies"] < 0.7
    assert valid[100]["rewards/accuracies"] > 0.8
    assert valid[100]["rewards/margins"] > valid[0]["rewards/margins"] + 1


def test_torchrun_runs_the_launcher_file(clone, tmp_path):
    out = tmp_path / "mock"
    flags = [
        "--mock-data",
        "--vocab-size",
        "128",
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--tensor-model-parallel-size",
        "2",
        "--train-iters",
        "2",
        "--log-interval",
        "1",
        "--save",
        str(out),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "examples/pretrain_simpo.sh",
            *flags,
        ],
        cwd=clone,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration 2/2" in proc.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_configuration_error_exits_cleanly(clone):
    proc = subprocess.run(
        ["bash", "examples/pretrain_simpo.sh", "--mock-data", "--tensor-model-parallel-size", "2"],
        cwd=clone,
        env=_clean_env(GPUS_PER_NODE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0  # the rank exits 2; torchrun reports any failure as 1
    assert "error: world size 1 is not divisible by --tensor-model-parallel-size (2)" in proc.stderr
    assert "ConfigError" not in proc.stderr  # a message, not a traceback from the trainer


def test_flags_apply_on_top_of_the_example_and_a_finished_run_says_so(clone, tmp_path):
    out = tmp_path / "short"
    env = _clean_env(OUTPUT_DIR=str(out))
    run = ["bash", "examples/pretrain_simpo.sh", "--train-iters", "2", "--log-interval", "1"]
    proc = subprocess.run(run, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration 2/2" in proc.stdout and f"saved checkpoint {out}/iter_0000002" in proc.stdout
    again = subprocess.run(run, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"already trained: {out} is at iteration 2 and --train-iters is 2" in again.stdout
    assert "saved checkpoint" not in again.stdout


# ------------------------------------------------------------ the shell halves, with stand-ins
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0")" "$@" > "$STUB_LOG.$(basename "$0").${SLURM_NODEID:-x}"
"""


# A stand-in srun: records its flags, refuses a flag it does not know and task counts that do
# not add up (as srun does), then runs the command once per task with that task's SLURM_NODEID,
# SLURM_PROCID and SLURM_LOCALID, recording each task's node.
SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG.srun"
nodes=1; per_node=1; ntasks=""
while [[ "$1" == -* ]]; do
    case "$1" in
        --nodes=*) nodes=${1#*=} ;;
        --ntasks-per-node=*) per_node=${1#*=} ;;
        --ntasks=*) ntasks=${1#*=} ;;
        --cpus-per-task=* | --kill-on-bad-exit=*) ;;
        *) echo "srun: unrecognized option '$1'" >&2; exit 2 ;;
    esac
    shift
done
if (( nodes > SLURM_NNODES )); then echo "srun: --nodes=$nodes exceeds the allocation's $SLURM_NNODES" >&2; exit 2; fi
if [[ -n $ntasks ]] && (( ntasks != nodes * per_node )); then
    echo "srun: --ntasks=$ntasks does not match --nodes=$nodes x --ntasks-per-node=$per_node" >&2; exit 2
fi
: > "$STUB_LOG.srun.tasks"
for node in $(seq 0 $((nodes - 1))); do
    for local in $(seq 0 $((per_node - 1))); do
        echo "$node" >> "$STUB_LOG.srun.tasks"
        SLURM_NODEID=$node SLURM_PROCID=$((node * per_node + local)) SLURM_LOCALID=$local "$@" || exit 1
    done
done
"""


def _stub_bin(tmp_path, *names, srun=False) -> str:
    """A directory of stand-in commands that record their arguments (srun runs its command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    if srun:
        (bin_dir / "srun").write_text(SRUN)
        (bin_dir / "srun").chmod(0o755)
        # A long host list, as a large allocation has: a reader that stops after the first line
        # leaves scontrol writing into a closed pipe (SIGPIPE, exit 141 under pipefail).
        (bin_dir / "scontrol").write_text(
            "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\nseq -f 'node-c%g' 200000\n"
        )
        (bin_dir / "scontrol").chmod(0o755)
    return str(bin_dir)


def _recorded(tmp_path, name: str, node: str = "x") -> list[str]:
    return (tmp_path / f"log.{name}.{node}").read_text().splitlines()[1:]


@pytest.mark.parametrize("script", ["examples/pretrain_simpo.sh", "examples/slurm/sbatch_simpo.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _launch(tmp_path, *args, path_dirs, **env):
    base = {"PATH": os.pathsep.join([*path_dirs, "/usr/bin", "/bin"]), "STUB_LOG": str(tmp_path / "log")}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "examples/pretrain_simpo.sh"), *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_launcher_multi_node_rendezvous(tmp_path):
    stubs = _stub_bin(tmp_path, "torchrun")
    _launch(
        tmp_path,
        "--mock-data",
        "--train-iters",
        "3",
        path_dirs=[stubs],
        NNODES="4",
        NODE_RANK="2",
        MASTER_ADDR="head",
        MASTER_PORT="7000",
        GPUS_PER_NODE="8",
    )
    argv = _recorded(tmp_path, "torchrun")
    assert argv[:10] == [
        "--nproc-per-node",
        "8",
        "--nnodes",
        "4",
        "--node-rank",
        "2",
        "--master-addr",
        "head",
        "--master-port",
        "7000",
    ]
    assert argv[-4:] == [os.path.join(REPO, "examples/pretrain_simpo.sh"), "--mock-data", "--train-iters", "3"]


@pytest.mark.parametrize("visible, expected", [("0,1,2", "3"), ("", "1"), (None, "1")])
def test_launcher_counts_the_visible_gpus(tmp_path, visible, expected):
    stubs = _stub_bin(tmp_path, "torchrun")
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    _launch(tmp_path, "--mock-data", path_dirs=[stubs], **env)  # no nvidia-smi on this PATH
    argv = _recorded(tmp_path, "torchrun")
    assert argv[:3] == ["--nproc-per-node", expected, "--standalone"]


@pytest.mark.parametrize("listed, expected", [("GPU 0: H100 (UUID: a)\nGPU 1: H100 (UUID: b)\n", "2"), ("", "1")])
def test_launcher_counts_the_gpus_nvidia_smi_lists(tmp_path, listed, expected):
    stubs = _stub_bin(tmp_path, "torchrun")
    (Path(stubs) / "nvidia-smi").write_text(f"#!/usr/bin/env bash\nprintf '{listed}'\n")
    (Path(stubs) / "nvidia-smi").chmod(0o755)
    _launch(tmp_path, "--mock-data", path_dirs=[stubs])  # CUDA_VISIBLE_DEVICES unset
    assert _recorded(tmp_path, "torchrun")[:2] == ["--nproc-per-node", expected]


def test_launcher_without_torchrun_uses_the_module(tmp_path):
    stubs = _stub_bin(tmp_path, "python-stub")
    _launch(tmp_path, "--mock-data", path_dirs=[stubs], PYTHON=os.path.join(stubs, "python-stub"))
    argv = _recorded(tmp_path, "python-stub")
    assert argv[:4] == ["-m", "torch.distributed.run", "--nproc-per-node", "1"]


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    stubs = _stub_bin(tmp_path, "torchrun", srun=True)
    env = {
        "PATH": os.pathsep.join([stubs, "/usr/bin", "/bin"]),
        "STUB_LOG": str(tmp_path / "log"),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "41",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "96",
        "SLURM_SUBMIT_DIR": REPO,
        "CKPT_DIR": str(tmp_path / "ckpt"),
        "HF_MODEL": "/models/llama",
        "TRAIN_DATA": "0.7 /data/a 0.3 /data/b",
        "VALID_DATA": "",
    }
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "examples/slurm/sbatch_simpo.sh"), "--train-iters", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    srun = (tmp_path / "log.srun").read_text().splitlines()
    assert srun[:5] == ["--nodes=2", "--ntasks-per-node=1", "--ntasks=2", "--cpus-per-task=96", "--kill-on-bad-exit=1"]
    assert (tmp_path / "log.srun.tasks").read_text().split() == ["0", "1"]  # one launcher per node
    for node in ("0", "1"):
        argv = _recorded(tmp_path, "torchrun", node)
        assert argv[:10] == [
            "--nproc-per-node",
            "8",
            "--nnodes",
            "2",
            "--node-rank",
            node,
            "--master-addr",
            "node-a",
            "--master-port",
            str(20000 + 41),
        ]
        flags = argv[11:]
        assert flags[flags.index("--data-path") + 1 :][:4] == ["0.7", "/data/a", "0.3", "/data/b"]
        assert "--valid-data-path" not in flags and flags[-2:] == ["--train-iters", "5"]
        assert flags[flags.index("--load") + 1] == "/models/llama"


def test_srun_stand_in_refuses_what_srun_refuses(tmp_path):
    """The stand-in's checks can fail: the Slurm script's srun line passes them for a reason."""
    srun = os.path.join(_stub_bin(tmp_path, srun=True), "srun")
    env = {"PATH": "/usr/bin:/bin", "STUB_LOG": str(tmp_path / "log"), "SLURM_NNODES": "2"}
    for flags, error in [
        (["--nodes=2", "--ntasks-per-node=1", "--ntasks=3"], "does not match"),
        (["--nodes=3"], "exceeds the allocation"),
        (["--gres=gpu:8"], "unrecognized option"),
    ]:
        proc = subprocess.run([srun, *flags, "true"], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and error in proc.stderr, (flags, proc.stderr)
    proc = subprocess.run([srun, "--nodes=2", "--ntasks-per-node=2", "true"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 0 and (tmp_path / "log.srun.tasks").read_text().split() == ["0", "0", "1", "1"]


def test_launcher_passes_max_restarts_to_torchrun(tmp_path):
    stubs = _stub_bin(tmp_path, "torchrun")
    _launch(tmp_path, "--mock-data", path_dirs=[stubs], MAX_RESTARTS="2", GPUS_PER_NODE="2")
    argv = _recorded(tmp_path, "torchrun")
    assert argv[:5] == ["--nproc-per-node", "2", "--standalone", "--max-restarts", "2"]
    assert argv[5:] == [os.path.join(REPO, "examples/pretrain_simpo.sh"), "--mock-data"]


def test_slurm_script_passes_the_time_limit_warning_on_and_requeues(tmp_path):
    """Slurm signals the batch shell (--signal=B:TERM@120): it must reach srun (and so the
    training processes, which save), and the job must requeue itself to resume."""
    stubs = _stub_bin(tmp_path)
    log = tmp_path / "log"
    # srun: the warning arrives while it runs; it records the TERM it is passed and ends.
    (Path(stubs) / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo TERM >> \"$STUB_LOG.srun\"; exit 0' TERM\n"
        "kill -TERM $PPID\n"
        "for _ in $(seq 300); do sleep 0.1; done\n"
        "exit 1\n"
    )
    (Path(stubs) / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = show ]; then printf "node-a\\n"; else echo "$@" >> "$STUB_LOG.scontrol"; fi\n'
    )
    for name in ("srun", "scontrol"):
        (Path(stubs) / name).chmod(0o755)
    env = {
        "PATH": os.pathsep.join([stubs, "/usr/bin", "/bin"]),
        "STUB_LOG": str(log),
        "SLURM_JOB_NODELIST": "node-a",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "41",
        "SLURM_SUBMIT_DIR": REPO,
        "CKPT_DIR": str(tmp_path / "ckpt"),
    }
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "examples/slurm/sbatch_simpo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "log.srun").read_text() == "TERM\n"
    assert (tmp_path / "log.scontrol").read_text() == "requeue 41\n"
    assert "requeueing job 41" in proc.stdout
