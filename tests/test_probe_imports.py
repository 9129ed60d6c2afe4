"""The probe talks to the Backend interface only: importing it must not load FSDP, DTensor or
DeepSpeed (a single-process user pays for none of them, and the algorithm cannot reach for
their private APIs)."""
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch.distributed.fsdp", "torch.distributed.tensor", "deepspeed")


def _modules_loaded_by(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'deepspeed' "
            f"or m.startswith({HEAVY[:2]!r})))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return proc.stdout.split()


def test_importing_the_probe_loads_no_sharding_framework():
    assert _modules_loaded_by("import gradprobe_dist.probe") == []
    assert _modules_loaded_by("from gradprobe_dist import GradProbe, MagnitudePruning") == []


def test_the_check_sees_a_sharding_framework_when_one_is_loaded():
    """Control: the same check names the modules once the FSDP backend is imported."""
    loaded = _modules_loaded_by("import gradprobe_dist.parallel.fsdp")
    assert any(m.startswith("torch.distributed.fsdp") for m in loaded)
    assert any(m.startswith("torch.distributed.tensor") for m in loaded)
