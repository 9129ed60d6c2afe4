"""Running the CLI in tests: in this process with --json, or as a real 2-rank torchrun job
that is killed, never waited on, if it hangs. Shared by the CLI, resume and iterative tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gradprobe_dist import cli

REPO = Path(__file__).resolve().parent.parent
TWO_RANK_TIMEOUT = 180  # seconds; a hung job is killed, never waited on


def launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "gradprobe_dist", *map(str, args)]


def run_two_ranks(*args: str, timeout: float = TWO_RANK_TIMEOUT) -> subprocess.CompletedProcess:
    """A real 2-rank torchrun job; the whole process group is killed if it outlives ``timeout``."""
    proc = subprocess.Popen(torchrun_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=launch_env(), cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def run_json(capsys, *argv: str):
    """cli.main in this process with --json; stdout must hold the JSON result and nothing else."""
    capsys.readouterr()
    assert cli.main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)
