"""The launchers, run for real: launch/slurm.sbatch on a single-node SLURM cluster started by
the test (preempted mid-run, it requeues itself and resumes from the mask checkpoint, ending
with the masks of an uninterrupted run), and launch/deepspeed.sh starting ranks that join.

SLURM and munge must be installed (scripts/install_slurm.sh; CI runs it): without them the
SLURM test fails, it does not skip.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from multiproc import free_port  # noqa: E402
from slurm_cluster import SlurmCluster, missing_requirements, wait_until  # noqa: E402

from gradprobe_dist.checkpoint.store import load_masks, read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYERS_PER_BLOCK = 4  # TinyGPT: attn.qkv, attn.proj, mlp.fc, mlp.proj
N_LAYER = 6
# One block per stage and enough batches that a stage takes ~1-2 s on 2 CPU ranks: the
# preemption lands after stage 0 and well before the last stage.
TINY_RUN = {
    "model": {"kind": "tinygpt", "random_init": True,
              "options": {"vocab_size": 256, "block_size": 32, "n_layer": N_LAYER, "n_head": 2, "n_embd": 32}},
    "data": {"micro_batch_size": 4},
    "prune": {"strategy": "magnitude", "sparsity": 0.5, "num_batches": 48, "stage_size": 1},
    "parallel": "ddp",
    "device": "cpu",
}


def _job_env(**extra) -> dict:
    """This Python first on PATH, the repo importable, no launcher variables from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                        "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _start(*args: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "gradprobe_dist", *args], cwd=REPO, env=_job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(process: subprocess.Popen) -> None:
    """End a started command if it still runs; SIGTERM first so torchrun stops its workers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _finish(process: subprocess.Popen, timeout: float) -> str:
    """Wait for a started command; its output, or AssertionError if it failed."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        _stop(process)
    assert process.returncode == 0, f"{process.args} failed:\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def cluster():
    missing = missing_requirements()
    if missing:
        pytest.fail("the SLURM test starts a local cluster and needs: " + "; ".join(missing)
                    + ". CI runs scripts/install_slurm.sh as root.", pytrace=False)
    with SlurmCluster.running() as running:
        yield running


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("slurm_run")
    _finish(_start("make-shards", "--bundled", "train", "--out", str(work / "calib"), "--seq-len", "32",
                   "--samples-per-shard", "64", "--max-samples", "512"), timeout=60)
    config = work / "tiny.yaml"
    run = dict(TINY_RUN, data=dict(TINY_RUN["data"], shards=str(work / "calib")),
               output_dir=str(work / "reference"))
    config.write_text(yaml.safe_dump(run))
    return config


def _layer_files(masks_dir: Path) -> dict[str, tuple[int, int]]:
    """Each checkpointed layer's file identity (inode, mtime): a rewrite changes it."""
    layers = read_manifest(masks_dir)["layers"]
    return {name: ((masks_dir / entry["file"]).stat().st_ino, (masks_dir / entry["file"]).stat().st_mtime_ns)
            for name, entry in layers.items()}


def _layers_done(masks_dir: Path) -> int:
    try:
        return len(read_manifest(masks_dir)["layers"])
    except (OSError, ValueError):  # not written yet
        return 0


def test_preempted_slurm_job_requeues_itself_and_resumes_to_the_same_masks(cluster, tiny_config):
    work = tiny_config.parent
    total = N_LAYER * LAYERS_PER_BLOCK
    masks_dir, log = work / "slurm_masks", work / "job.out"
    job = cluster.sbatch("--output", str(log), str(REPO / "launch" / "slurm.sbatch"), str(tiny_config),
                         f"output_dir={masks_dir}", cwd=REPO, env=_job_env(MASTER_PORT=str(free_port())))

    def first_stage_done() -> bool:
        if _layers_done(masks_dir) >= LAYERS_PER_BLOCK:
            return True
        state = cluster.state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} {state}:\n{log.read_text()[-3000:]}"
        return False

    wait_until(first_stage_done, 90, f"stage 0 of job {job} to be checkpointed (log {log})")

    # A job in the higher-priority partition needs the whole node: SLURM preempts ours.
    urgent_log = work / "urgent.out"
    cluster.sbatch("--partition=urgent", "--exclusive", "--output", str(urgent_log),
                   "--wrap", "echo urgent job ran", cwd=work, env=_job_env())
    wait_until(lambda: cluster.state(job) != "RUNNING", 30, f"job {job} to stop after preemption")
    first_run = _layer_files(masks_dir)  # the first run's ranks have exited
    assert LAYERS_PER_BLOCK <= len(first_run) < total, "preempted too late: make the stages slower"

    # The uninterrupted reference (same config, same 2 ranks, plain torchrun, no SLURM) runs
    # while the requeued job waits out its restart delay.
    reference_run = _start("prune", "--config", str(tiny_config), "--quiet",
                           launcher=("torchrun", "--standalone", "--nproc_per_node=2", "-m"))
    try:
        final = cluster.wait_finished(job, 150)
        _finish(reference_run, timeout=150)
    finally:
        _stop(reference_run)
    text = log.read_text()
    assert final == "COMPLETED", f"job {job} ended {final}:\n{text[-3000:]}"
    assert urgent_log.read_text().strip() == "urgent job ran"
    # First run: signalled and requeued by its trap; second run: a restart of the same job.
    assert "SLURM_RESTART_COUNT=0" in text and "USR1 (preemption" in text
    assert "SLURM_RESTART_COUNT=1" in text, text[-3000:]
    assert "Restarts=1 " in cluster.run("scontrol", "-o", "show", "job", str(job)).stdout
    # The resumed run skipped the finished stages and wrote only the missing layers ...
    summary = re.findall(r"(\d+) layers written, (\d+)/(\d+) stages resumed", text)
    assert len(summary) == 1, text[-3000:]  # only the resumed run got to its summary
    written, resumed, stages = map(int, summary[0])
    assert (written, stages) == (total - len(first_run), N_LAYER)
    assert resumed == len(first_run) // LAYERS_PER_BLOCK >= 1
    # ... leaving the first run's files untouched,
    after = _layer_files(masks_dir)
    assert {name: after[name] for name in first_run} == first_run
    # and the masks are those of the uninterrupted run.
    masks, reference = load_masks(masks_dir), load_masks(work / "reference")
    assert len(reference) == total and masks.keys() == reference.keys()
    assert all(mask.any() for mask in reference.values())  # masks that prune something
    for name, mask in reference.items():
        assert torch.equal(masks[name], mask), name


def test_deepspeed_launcher_starts_ranks_that_join_one_group_and_prune(tiny_config):
    """The launcher's ranks parse the CLI (no --local_rank clash), form one group from
    DeepSpeed's environment and write a checkpoint (parallel=ddp: a ZeRO-3 engine would add
    ~20 s of set-up to what this checks)."""
    masks_dir = tiny_config.parent / "deepspeed_masks"
    process = subprocess.Popen(
        ["bash", str(REPO / "launch" / "deepspeed.sh"), "prune", "--config", str(tiny_config),
         "parallel=ddp", f"output_dir={masks_dir}", "model.options.n_layer=1", "prune.stage_size=0",
         "prune.num_batches=2"],
        cwd=REPO, env=_job_env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output = _finish(process, timeout=180)
    for rank in (0, 1):
        assert f"rank {rank} of 2" in output, output[-3000:]
    assert len(load_masks(masks_dir)) == LAYERS_PER_BLOCK
