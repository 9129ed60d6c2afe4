"""Nothing a user wrote is lost and no wrong result passes silently: one job per output_dir
(one process and 2-rank torchrun, also after the torchrun parent was SIGKILLed while its
ranks kept running), --restart deletes only a checkpoint's own files, eval/inspect/plot
refuse partial checkpoints, resume refuses other weights or other shards, the recovery from a
bad layer file redoes its stage, and two identical runs write identical layer files."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradprobe_dist import cli
from gradprobe_dist.checkpoint import DirectoryInUseError, DirectoryLock, MaskCheckpoint, load_masks
from gradprobe_dist.checkpoint.lock import LOCK_NAME
from gradprobe_dist.data.shards import bundled_text_path, write_text_shards
from gradprobe_dist.models import TinyGPT, TinyGPTConfig
from gradprobe_dist.pipeline.build import save_weights

sys.path.insert(0, os.path.dirname(__file__))
from cli_helpers import REPO, TWO_RANK_TIMEOUT, launch_env, run_json, torchrun_command  # noqa: E402
from test_pipeline import STAGE_LAYERS, TINY_GPT, write_config  # noqa: E402
from test_pipeline_iterative import forget_layers  # noqa: E402
from test_resume import _worker_pid, config, data, reference  # noqa: E402,F401 (fixtures)

LAYERS = [n for stage in STAGE_LAYERS for n in stage]

# A prune that stops before writing its 3rd layer file until the file named by GO exists,
# after creating the file named by PAUSED: a job that is surely running while another starts.
PAUSING_PRUNE = """
import os, sys, time
from pathlib import Path
from gradprobe_dist.checkpoint import store
from gradprobe_dist import cli
real_write, writes = store.atomic_write, []
def write(path, data):
    if path.suffix == ".safetensors":
        writes.append(path)
        if len(writes) == 3:
            Path(os.environ["PAUSED"]).touch()
            while not Path(os.environ["GO"]).exists():
                time.sleep(0.05)
    real_write(path, data)
store.atomic_write = write
sys.exit(cli.main(sys.argv[1:]))
"""


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("ERROR")]


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TWO_RANK_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (exit {proc.returncode}) before pausing:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never paused")
        time.sleep(0.05)


def start_pausing(tmp_path: Path, command: list[str], *args: str) -> tuple[subprocess.Popen, Path]:
    """A paused prune (see PAUSING_PRUNE); returns it and the file that lets it go on."""
    script = tmp_path / "pausing_prune.py"
    script.write_text(PAUSING_PRUNE)
    paused, go = tmp_path / "paused", tmp_path / "go"
    proc = subprocess.Popen([*command, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True,
                            env={**launch_env(), "PAUSED": str(paused), "GO": str(go)})
    wait_for(paused, proc, "the first job")
    return proc, go


def torchrun_script_command() -> list[str]:
    """torchrun of a script with 2 ranks (the script's path and arguments follow)."""
    command = torchrun_command()
    return command[:command.index("gradprobe_dist") - 1]


def holder_pid(masks: Path) -> int:
    return json.loads((masks / LOCK_NAME).read_text())["pid"]


# -- one job per output_dir ------------------------------------------------------------------
def test_a_second_job_on_a_directory_in_use_is_refused_naming_the_holder(config, reference, tmp_path,
                                                                         log_lines):
    masks = tmp_path / "masks"
    first, go = start_pausing(tmp_path, [sys.executable], "prune", "--config", str(config), "--quiet")
    try:
        assert cli.main(["prune", "--config", str(config), "--quiet"]) == 2
        (error,) = errors(log_lines)
        assert f"'{masks}' is in use by another job (pid {first.pid} on host {socket.gethostname()}" in error
        go.touch()
        _, err = first.communicate(timeout=TWO_RANK_TIMEOUT)
    finally:
        go.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, err[-3000:]
    assert MaskCheckpoint.read(masks).completed() == LAYERS  # every checksum holds
    assert all(torch.equal(load_masks(masks)[n], load_masks(reference)[n]) for n in LAYERS)
    assert not (masks / LOCK_NAME).exists()  # released at the end


def test_torchrun_jobs_on_a_directory_in_use_fail_on_every_rank_even_after_the_parent_was_killed(
        config, reference, tmp_path, log_lines):
    masks = tmp_path / "masks"
    ddp = ["--config", str(config), "parallel=ddp", "--quiet"]
    first, go = start_pausing(tmp_path, torchrun_script_command(), "prune", *ddp)
    try:
        rank0 = _worker_pid(first.pid, 0)
        assert holder_pid(masks) == rank0  # rank 0 holds the lock
        second = subprocess.run(torchrun_command("prune", *ddp), capture_output=True, text=True,
                                env=launch_env(), cwd=REPO, timeout=TWO_RANK_TIMEOUT)
        assert second.returncode != 0
        lines = second.stderr.splitlines()
        assert any(line.startswith(f"[rank 0] ERROR '{masks}' is in use by another job (pid {rank0} ")
                   for line in lines), second.stderr[-3000:]
        # rank 1 fails too: it reports the main rank's error, unless torchrun already stopped
        # it because rank 0 had exited (rank 1 waits 0.5 s so that rank 0's line comes first)
        assert any(line.startswith("[rank 1] ERROR the main rank failed: DirectoryInUseError: ")
                   for line in lines) or "rank      : 1 (local_rank: 1)" in second.stderr, \
            second.stderr[-3000:]

        os.kill(first.pid, signal.SIGKILL)  # the torchrun parent; its ranks keep running
        first.wait(timeout=30)
        time.sleep(1)
        os.kill(rank0, 0)  # still alive, still writing
        assert cli.main(["prune", "--config", str(config), "--quiet"]) == 2
        assert f"(pid {rank0} on host" in errors(log_lines)[0]
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the orphaned ranks too, still paused
        except ProcessLookupError:
            pass
        go.touch()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{rank0}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{rank0}").exists()
    assert cli.main(["prune", "--config", str(config), "--restart", "--quiet"]) == 0  # once it is gone
    assert MaskCheckpoint.read(masks).completed() == LAYERS


def test_the_lock_takes_over_only_a_dead_holder_on_this_host(tmp_path, log_lines):
    held = DirectoryLock(tmp_path).acquire()
    with pytest.raises(DirectoryInUseError, match=f"pid {os.getpid()} on host"):
        DirectoryLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / LOCK_NAME).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    with DirectoryLock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert any("from a job that is gone" in line for line in log_lines)

    lock_file.write_text(json.dumps({"host": "node-that-we-cannot-see", "pid": 1, "started": "x"}))
    with pytest.raises(DirectoryInUseError, match=f"host node-that-we-cannot-see.*delete {lock_file}"):
        DirectoryLock(tmp_path).acquire()


# -- --restart deletes only what a checkpoint owns -------------------------------------------
def test_restart_refuses_a_directory_that_is_not_a_checkpoint(config, tmp_path, log_lines):
    mine = tmp_path / "masks" / "layers" / "notes.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file")
    for extra in (["--restart"], []):
        log_lines.clear()
        assert cli.main(["prune", "--config", str(config), "--quiet", *extra]) == 2
        (error,) = errors(log_lines)
        assert "is not a mask checkpoint (no manifest.json) but holds 1 file(s), e.g. 'layers/notes" in error
    assert mine.read_text() == "a user's file"


def test_restart_deletes_only_the_files_the_manifest_names(config, tmp_path):
    masks = tmp_path / "masks"
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    mine = [masks / "layers" / "notes.txt", masks / "README"]
    for path in mine:
        path.write_text("a user's file")
    assert cli.main(["prune", "--config", str(config), "prune.sparsity=0.6", "--restart", "--quiet"]) == 0
    assert all(path.read_text() == "a user's file" for path in mine)
    assert MaskCheckpoint.read(masks).completed() == LAYERS


# -- eval, inspect and plot refuse a partial checkpoint ----------------------------------------
def test_a_partial_or_empty_checkpoint_is_refused_unless_allowed(config, reference, tmp_path, capsys, log_lines):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in reference.rglob("*"):
        if path.is_file():
            (partial / path.relative_to(reference)).parent.mkdir(parents=True, exist_ok=True)
            (partial / path.relative_to(reference)).write_bytes(path.read_bytes())
    forget_layers(partial, LAYERS[5:])
    commands = {"eval": ["eval", "--config", str(config), "--masks", str(partial)],
                "inspect": ["inspect", str(partial)],
                "plot": ["plot", str(partial), "--out", str(tmp_path / "png")]}
    for name, command in commands.items():
        log_lines.clear()
        assert cli.main([*command, "--quiet"]) == 2, name
        (error,) = errors(log_lines)
        assert f"'{partial}' is partial: 7 of its 12 layers are missing (e.g. '{LAYERS[5]}')" in error, name
        assert "--allow-partial" in error
    rows = run_json(capsys, "inspect", partial, "--allow-partial")
    assert [r["name"] for r in rows] == LAYERS[:5]
    dense = run_json(capsys, "eval", "--config", config, "--quiet")
    some = run_json(capsys, "eval", "--config", config, "--masks", partial, "--allow-partial", "--quiet")
    assert some != dense

    forget_layers(partial, LAYERS)
    log_lines.clear()
    assert cli.main(["eval", "--config", str(config), "--masks", str(partial), "--quiet"]) == 2
    assert "is partial: 12 of its 12 layers are missing" in errors(log_lines)[0]


def test_inspect_verifies_every_checksum(reference, tmp_path, log_lines):
    copy = tmp_path / "copy"
    for path in reference.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(reference)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(reference)).write_bytes(path.read_bytes())
    victim = copy / MaskCheckpoint.read(copy).layer_info(LAYERS[2])["file"]
    payload = bytearray(victim.read_bytes())
    payload[-1] ^= 0xFF
    victim.write_bytes(bytes(payload))
    assert cli.main(["inspect", str(copy), "--quiet"]) == 2
    (error,) = errors(log_lines)
    assert f"layer file '{victim}'" in error and "does not match its recorded sha256" in error


# -- resume fingerprints the weights and the shards ------------------------------------------
def test_resume_refuses_other_weights_at_model_path_naming_the_parameters(config, tmp_path, log_lines):
    weights = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_weights(TinyGPT(TinyGPTConfig.from_dict(TINY_GPT)), weights)
    assert cli.main(["prune", "--config", str(config), f"model.path={weights}", "--quiet"]) == 0
    before = files_of(tmp_path / "masks")
    torch.manual_seed(1)  # retrained into the same path: same names, shapes and dtypes
    save_weights(TinyGPT(TinyGPTConfig.from_dict(TINY_GPT)), weights)
    assert cli.main(["prune", "--config", str(config), f"model.path={weights}", "--quiet"]) == 2
    (error,) = errors(log_lines)
    assert f"parameter '{LAYERS[0]}' holds other weights than the checkpoint was made from" in error
    assert "--restart" in error
    assert files_of(tmp_path / "masks") == before


def test_resume_refuses_rewritten_calibration_shards(data, tmp_path, log_lines):
    shards = tmp_path / "calib"
    write_text_shards([bundled_text_path("train")], shards, seq_len=16, samples_per_shard=8, max_samples=64)
    config = write_config(tmp_path / "run.yaml", {**data, "calib": str(shards)}, output_dir=tmp_path / "masks")
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    for old in shards.iterdir():
        old.unlink()
    write_text_shards([bundled_text_path("train")], shards, seq_len=16, samples_per_shard=9, max_samples=72)
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 2
    (error,) = errors(log_lines)
    assert "config field 'data.shards_metadata' is {" in error and '"samples": 64' in error


# -- the stage is the unit of recovery -------------------------------------------------------
def test_a_bad_layer_file_is_recovered_by_redoing_its_stage_and_the_later_ones(config, reference, tmp_path,
                                                                               capsys, log_lines):
    masks = tmp_path / "masks"
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    victim = masks / MaskCheckpoint.read(masks).layer_info(LAYERS[5])["file"]  # stage 2's
    victim.write_bytes(victim.read_bytes()[:-10])
    stage1 = {k: v for k, v in files_of(masks).items() if any(n in k for n in STAGE_LAYERS[0])}
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 2
    (error,) = errors(log_lines)
    assert "rerun the prune with --redo-from-stage 2 to recompute stage 2" in error

    result = run_json(capsys, "prune", "--config", config, "--redo-from-stage", "2", "--quiet")
    assert result["layers_written"] == STAGE_LAYERS[1] + STAGE_LAYERS[2] and result["stages_resumed"] == 1
    after = files_of(masks)
    assert all(after[k] == v for k, v in stage1.items())  # stage 1 kept: same bytes, same mtime
    assert all(torch.equal(load_masks(masks)[n], load_masks(reference)[n]) for n in LAYERS)


# -- deterministic bytes ------------------------------------------------------------------------
def test_two_identical_runs_write_byte_identical_layer_files(config, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "gradprobe_dist", "prune", "--config", str(config),
                               f"output_dir={out}", "--quiet"], capture_output=True, text=True,
                              env={**launch_env(), "PYTHONHASHSEED": "random"}, cwd=REPO,
                              timeout=TWO_RANK_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append({p.name: p.read_bytes() for p in sorted((out / "layers").iterdir())})
    assert len(runs[0]) == len(LAYERS) and runs[0] == runs[1]


def test_validate_prints_the_config_hash_the_checkpoint_records(config, tmp_path, capsys):
    validated = run_json(capsys, "validate", "--config", config)
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "masks" / "manifest.json").read_text())
    assert validated["config_hash"] == manifest["config_hash"]
