"""Resume and reliability, with real processes where it matters: a rank SIGKILLed in the middle
of stage 2, a process killed inside a checkpoint write, a failing write, corrupt or missing
files, a changed config or model, and checkpoints moving between world sizes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradprobe_dist.checkpoint import store as checkpoint_module
from gradprobe_dist import cli
from gradprobe_dist.checkpoint.store import MaskCheckpoint, load_masks

sys.path.insert(0, os.path.dirname(__file__))
from cli_helpers import (REPO, TWO_RANK_TIMEOUT, launch_env, run_json, run_two_ranks,  # noqa: E402,F401
                         succeeded, torchrun_command)
from test_pipeline import STAGE_LAYERS, make_tiny_data, write_config  # noqa: E402

LAYERS = [n for stage in STAGE_LAYERS for n in stage]


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file of a checkpoint directory."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def layer_file(directory: Path, name: str) -> Path:
    return directory / MaskCheckpoint.read(directory).layer_info(name)["file"]


def assert_same_masks(directory: Path, reference: Path) -> None:
    ours, theirs = load_masks(directory), load_masks(reference)
    assert list(ours) == list(theirs) == LAYERS
    for name in LAYERS:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted one-process run: what every resumed one-process run must end with."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "run.yaml", data, output_dir=root / "masks")
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    return root / "masks"


@pytest.fixture
def config(data, tmp_path) -> Path:
    return write_config(tmp_path / "run.yaml", data, output_dir=tmp_path / "masks")


# -- one process: failures while writing -------------------------------------------------
def test_a_failing_layer_write_keeps_the_previous_checkpoint_and_resume_completes_it(
        config, reference, tmp_path, monkeypatch):
    masks = tmp_path / "masks"
    real_write = checkpoint_module.atomic_write

    def failing_write(path, payload):  # the 6th layer file (stage 2's 2nd layer) hits a full disk
        if path.name == f"{LAYERS[5]}.safetensors":
            raise OSError(28, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(checkpoint_module, "atomic_write", failing_write)
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 2  # one ERROR line: disk full
    monkeypatch.undo()

    kept = MaskCheckpoint.read(masks)
    assert kept.completed() == LAYERS[:5]  # valid and loadable: the first five layers
    saved = load_masks(masks)
    for name in LAYERS[:5]:
        assert torch.equal(saved[name], load_masks(reference)[name])
    assert not list(masks.rglob("*.tmp"))
    before = snapshot(masks)

    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    assert_same_masks(masks, reference)
    after = snapshot(masks)
    for name in LAYERS[:4]:  # stage 1 was not written again
        key = f"layers/{name}.safetensors"
        assert after[key] == before[key]


CRASH_IN_MANIFEST_WRITE = """
import os, signal, sys
from gradprobe_dist import cli
real_replace, manifests = os.replace, []
def replace(src, dst):
    if str(dst).endswith("manifest.json"):
        manifests.append(dst)
        if len(manifests) == 7:  # the checkpoint's creation, then one per layer: layer 6's
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_process_killed_inside_a_manifest_write_leaves_a_valid_checkpoint(config, reference, tmp_path):
    masks = tmp_path / "masks"
    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_MANIFEST_WRITE, "prune", "--config", str(config),
                              "--quiet"], env=launch_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=TWO_RANK_TIMEOUT)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert list(masks.glob(".manifest.json.*.tmp")), "the kill did not land inside the manifest write"
    assert (masks / "layers" / f"{LAYERS[5]}.safetensors").exists()  # written, but not recorded
    assert MaskCheckpoint.read(masks).completed() == LAYERS[:5]
    assert list(load_masks(masks)) == LAYERS[:5]

    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    assert_same_masks(masks, reference)
    assert not list(masks.rglob("*.tmp"))


# -- one process: what a resume refuses ----------------------------------------------------
def test_resume_of_a_finished_run_recomputes_nothing(config, tmp_path, capsys, log_lines):
    first = run_json(capsys, "prune", "--config", config, "--quiet")
    before = snapshot(tmp_path / "masks")
    again = run_json(capsys, "prune", "--config", config)
    assert again["layers_written"] == [] and again["stages_resumed"] == 3
    assert again["layers"] == first["layers"] and again["sparsity"] == first["sparsity"]
    assert snapshot(tmp_path / "masks") == before
    assert any(line.startswith("INFO resuming: 3 of 3 stages already in") for line in log_lines)


def test_a_changed_sparsity_is_refused_naming_the_field_and_restart_discards(config, tmp_path, log_lines):
    masks = tmp_path / "masks"
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    before = snapshot(masks)
    assert cli.main(["prune", "--config", str(config), "prune.sparsity=0.6", "--quiet"]) == 2
    assert any(line.startswith("ERROR") and "config field 'prune.sparsity' is 0.5 in the checkpoint but "
               "0.6 now" in line and "--restart" in line for line in log_lines)
    assert snapshot(masks) == before  # nothing touched

    assert cli.main(["prune", "--config", str(config), "prune.sparsity=0.6", "--restart", "--quiet"]) == 0
    fresh = MaskCheckpoint.read(masks)
    assert json.loads((masks / "manifest.json").read_text())["config"]["prune.sparsity"] == 0.6
    assert fresh.completed() == LAYERS
    assert all(fresh.layer_info(n)["tentative"] == int(0.6 * fresh.layer_info(n)["numel"]) for n in LAYERS)


def test_a_changed_model_is_refused_naming_the_parameter(config, log_lines):
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    assert cli.main(["prune", "--config", str(config), "--quiet",
                     "model.options={n_embd: 32, n_head: 2, n_layer: 3, block_size: 16}"]) == 2
    assert any("parameter 'blocks.0.attn.qkv.weight' has shape [48, 16] in the checkpoint but [96, 32] now"
               in line for line in log_lines)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete"])
def test_a_damaged_mask_file_is_named_and_nothing_else_is_lost(config, tmp_path, damage, log_lines):
    masks = tmp_path / "masks"
    assert cli.main(["prune", "--config", str(config), "--quiet"]) == 0
    victim = layer_file(masks, LAYERS[6])
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "flip a byte":
        payload = bytearray(victim.read_bytes())
        payload[-1] ^= 0xFF
        victim.write_bytes(bytes(payload))
    else:
        victim.unlink()
    before = snapshot(masks)
    for command in (["prune", "--config", str(config)], ["eval", "--config", str(config), "--masks", str(masks)]):
        log_lines.clear()
        assert cli.main([*command, "--quiet"]) == 2
        errors = [line for line in log_lines if line.startswith("ERROR")]
        assert len(errors) == 1 and f"layer file '{victim}'" in errors[0]
        assert ("is missing" if damage == "delete" else "does not match its recorded sha256") in errors[0]
    assert snapshot(masks) == before
    kept = MaskCheckpoint.read(masks)
    assert all(kept.load_layer(n).shape for n in LAYERS if n != LAYERS[6])  # the rest still loads


# -- two ranks (real torchrun) -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_config(data, tmp_path_factory) -> Path:
    """FSDP over 2 ranks; 8 calibration batches make each stage's probe long enough to be
    killed in the middle of."""
    root = tmp_path_factory.mktemp("two")
    return write_config(root / "run.yaml", data, output_dir=root / "unused", parallel="fsdp",
                        prune={"num_batches": 8})


@pytest.fixture(scope="module")
def uninterrupted(two_rank_config, tmp_path_factory):
    """An uninterrupted 2-rank FSDP run: (its checkpoint, its JSON result)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "masks"
    result = succeeded(run_two_ranks("prune", "--config", two_rank_config, f"output_dir={out}", "--json"))
    return out, json.loads(result.stdout)


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the agent)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


def test_sigkill_of_one_rank_in_stage_2_then_rerun_matches_an_uninterrupted_run(
        two_rank_config, uninterrupted, tmp_path):
    masks = tmp_path / "masks"
    command = ["prune", "--config", str(two_rank_config), f"output_dir={masks}"]
    proc = subprocess.Popen(torchrun_command(*command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=launch_env(), cwd=REPO, start_new_session=True)
    watchdog = threading.Timer(TWO_RANK_TIMEOUT, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:  # rank 0 announces each stage before probing it
            seen.append(line)
            if line.startswith("[rank 0] INFO stage 2/3: probing"):
                os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
                killed_at = time.monotonic()
                break
        else:
            pytest.fail("stage 2 never started:\n" + "".join(seen[-30:]))
        proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode != 0 and time.monotonic() - killed_at < 60
    assert MaskCheckpoint.read(masks).completed() == STAGE_LAYERS[0], "the kill missed stage 2"
    stage1 = {k: v for k, v in snapshot(masks).items() if k.startswith("layers/")}

    rerun = succeeded(run_two_ranks(*command, "--json"))
    result = json.loads(rerun.stdout)
    assert result["stages_resumed"] == 1 and result["layers_written"] == STAGE_LAYERS[1] + STAGE_LAYERS[2]
    assert "[rank 0] INFO resuming: 1 of 3 stages already in" in rerun.stderr
    after = snapshot(masks)
    assert all(after[k] == v for k, v in stage1.items())  # stage 1 untouched: same bytes, same mtime
    assert_same_masks(masks, uninterrupted[0])
    assert result["layers"] == uninterrupted[1]["layers"]


def test_a_corrupt_file_fails_every_rank_with_the_file_named(two_rank_config, uninterrupted, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(uninterrupted[0], masks)
    victim = layer_file(masks, LAYERS[3])
    victim.write_bytes(victim.read_bytes()[:20])
    result = run_two_ranks("prune", "--config", two_rank_config, f"output_dir={masks}")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"[rank 0] ERROR layer file '{victim}'") for line in lines), result.stderr[-3000:]
    assert any(line.startswith("[rank 1] ERROR the main rank failed: CorruptCheckpointError: "
                               f"layer file '{victim}'") for line in lines), result.stderr[-3000:]


def test_a_two_rank_checkpoint_loads_in_one_process_but_does_not_resume_there(
        two_rank_config, uninterrupted, tmp_path, capsys, log_lines):
    masks_dir = uninterrupted[0]
    out = tmp_path / "pruned.safetensors"
    run_json(capsys, "export", "--config", two_rank_config, "--masks", masks_dir, "--out", out)
    weights, masks = load_file(out), load_masks(masks_dir)
    assert list(masks) == LAYERS
    for name in LAYERS:
        assert torch.equal(weights[name] == 0, masks[name]), name
    masked = run_json(capsys, "eval", "--config", two_rank_config, "--masks", masks_dir, "--quiet")
    exported = run_json(capsys, "eval", "--config", two_rank_config, f"model.path={out}", "--quiet")
    assert masked == exported

    before = snapshot(masks_dir)
    assert cli.main(["prune", "--config", str(two_rank_config), f"output_dir={masks_dir}", "--quiet"]) == 2
    assert any("config field 'world_size' is 2 in the checkpoint but 1 now" in line for line in log_lines)
    assert snapshot(masks_dir) == before
