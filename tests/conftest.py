import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def log_lines():
    """Messages the gradprobe_dist logger emits, as ``LEVEL message`` strings."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{record.levelname} {record.getMessage()}")
    logger = logging.getLogger("gradprobe_dist")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
