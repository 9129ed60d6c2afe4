"""Process-group set-up: no launcher, srun-style SLURM variables, torchrun, and reuse."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from multiproc import free_port, run_ranks  # noqa: E402

from gradprobe_dist.runtime.env import (  # noqa: E402
    DistEnv,
    destroy_distributed,
    init_distributed,
    read_launch,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Joins the group twice (idempotence), sums rank + 1 over ranks, writes what it saw.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from gradprobe_dist.runtime.env import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    env = init_distributed()
    again = init_distributed()
    total = torch.tensor([env.rank + 1])
    dist.all_reduce(total)
    seen = dict(rank=env.rank, world=env.world_size, local_rank=env.local_rank,
                device=str(env.device), backend=env.backend, is_main=env.is_main,
                sum=int(total), same_again=again == env, group_world=dist.get_world_size(),
                exported_rank=os.environ["RANK"])
    destroy_distributed()
    destroy_distributed()  # safe twice
    seen["left"] = not dist.is_initialized()
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump(seen, f)
""")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _read_ranks(out_dir, world):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def _check_two_rank_group(seen):
    for r, rank_seen in enumerate(seen):
        assert rank_seen == dict(rank=r, world=2, local_rank=r, device="cpu", backend="gloo",
                                 is_main=r == 0, sum=3, same_again=True, group_world=2,
                                 exported_rank=str(r), left=True)


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)


# -- single process ----------------------------------------------------------------------
def test_plain_process_is_world_one_without_a_group(no_launcher):
    env = init_distributed(device="cpu")
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert env.is_main and not dist.is_initialized()
    assert init_distributed(device="cpu") == env
    default = init_distributed()
    assert default.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    destroy_distributed()  # nothing to destroy: no error


def test_single_slurm_task_runs_without_a_group(no_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert read_launch() is None
    assert init_distributed(device="cpu").backend is None and not dist.is_initialized()


def test_bad_device_and_backend_are_named(no_launcher):
    with pytest.raises(ValueError, match="backend='gloo'"):
        init_distributed(backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        init_distributed(device="banana")
    with pytest.raises(TypeError, match="backend must be a string"):
        init_distributed(backend=None, device="cpu")
    if torch.cuda.is_available():
        assert init_distributed(device="cuda").device == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed(device="cuda")


# -- reading launcher variables ------------------------------------------------------------
def test_torchrun_variables_win_over_slurm():
    launch = read_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                          "MASTER_PORT": "2345", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank,
            launch.master_addr, launch.master_port) == ("torchrun", 3, 4, 1, "node7", 2345)


def test_slurm_port_comes_from_the_job_id_and_single_node_uses_loopback(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    base = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu-node-17"}
    first, again = read_launch({**base, "SLURM_JOB_ID": "4242"}), read_launch({**base, "SLURM_JOB_ID": "4242"})
    other_job = read_launch({**base, "SLURM_JOB_ID": "4243"})
    assert first == again and first.master_port != other_job.master_port
    assert 1024 < first.master_port < 65536
    assert (first.launcher, first.rank, first.world_size, first.local_rank, first.master_addr) == \
        ("slurm", 1, 2, 1, "127.0.0.1")
    assert read_launch({**base, "MASTER_PORT": "3456", "MASTER_ADDR": "head"}).master_port == 3456


def test_slurm_master_addr_is_the_first_host_from_scontrol(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[1-2]" ] && printf "localhost\\nnode2\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    launch = read_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "2",
                          "SLURM_JOB_NODELIST": "node[1-2]"})
    assert launch.master_addr == "localhost"


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside [0, WORLD_SIZE=2)"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"SLURM_NTASKS": "2"}, "SLURM_PROCID unset"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"},
     "export MASTER_ADDR"),
])
def test_bad_launch_variables_name_the_problem_and_fix(environ, words, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    with pytest.raises(ValueError) as raised:
        read_launch(environ)
    assert words in str(raised.value)


# -- real groups ---------------------------------------------------------------------------
def test_srun_style_slurm_variables_form_a_two_rank_gloo_group(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=_clean_env(
        SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="77", MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    _check_two_rank_group(_read_ranks(tmp_path, 2))


def test_torchrun_forms_a_two_rank_gloo_group(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path)],
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_two_rank_group(_read_ranks(tmp_path, 2))


def _reuse_existing_group(rank, world):
    group_before = dist.group.WORLD
    env = init_distributed()
    return (env.rank, env.world_size, env.local_rank, env.backend, str(env.device),
            dist.group.WORLD is group_before)


def test_an_existing_group_is_reused():
    assert run_ranks(_reuse_existing_group, 2, timeout=120) == [
        (r, 2, r, "gloo", "cpu", True) for r in range(2)]
