"""A rank that fails ends the whole torchrun job: non-zero exit, its message shown, no hang.

Rank 1 alone reads a corrupt shard (shard i goes to rank i % 2) and raises while building
its job; rank 0 goes on into the first collective and must not wait there forever.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 120
CONFIG = """\
model:
  kind: tinygpt
  random_init: true
  options: {{vocab_size: 256, block_size: 16, n_layer: 2, n_head: 2, n_embd: 32}}
data:
  shards: {shards}
  micro_batch_size: 2
prune:
  strategy: magnitude
  num_batches: 2
parallel: ddp
output_dir: {masks}
device: cpu
"""
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "gradprobe_dist"],
    # prints rank 0 only, so rank 1's message reaches the user only through torchrun's summary
    "launch_script": ["bash", str(REPO / "launch" / "torchrun.sh")],
}


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """Shards where only rank 1's first shard is corrupt (same size, so the manifest's size
    check, which every rank runs, passes), and a config that prunes from them."""
    from gradprobe_dist.data.shards import bundled_text_path, write_text_shards

    root = tmp_path_factory.mktemp("launch")
    shards = write_text_shards([bundled_text_path()], root / "calib", seq_len=16, samples_per_shard=8,
                               max_samples=32)
    assert len(shards) == 4
    data = bytearray(shards[1].read_bytes())
    data[:512] = b"\xff" * 512  # the first tar header: bad checksum
    shards[1].write_bytes(bytes(data))
    config = root / "run.yaml"
    config.write_text(CONFIG.format(shards=root / "calib", masks=root / "masks"))
    return config, shards[1]


@pytest.mark.timeout(LIMIT_S + 30)
@pytest.mark.parametrize("launcher", [
    "torchrun",
    "launch_script",
])
def test_a_failing_rank_fails_the_job_with_its_message(broken_run, launcher):
    config, corrupt = broken_run
    env = dict(os.environ, OMP_NUM_THREADS="1", NPROC="2", LOG_RANKS="0", PYTHONPATH=str(REPO))
    started = time.monotonic()
    returncode, output = run_job([*LAUNCHERS[launcher], "prune", "--config", str(config)], env)
    seconds = time.monotonic() - started
    assert returncode != 0, output[-3000:]
    assert f"shard {corrupt} is truncated or corrupt" in output, output[-3000:]
    assert seconds < LIMIT_S


def run_job(command: list[str], env: dict) -> tuple[int, str]:
    """Run the launcher in its own session; on a hang kill the whole session (the launcher
    and its ranks), then fail."""
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"the job still ran after {LIMIT_S} s (a rank hangs):\n{output[-3000:]}")
    return job.returncode, output
