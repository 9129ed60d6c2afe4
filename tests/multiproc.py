"""The tests' name for ``gradprobe_dist.distributed.local_ranks`` (real gloo ranks, timeout)."""
from gradprobe_dist.distributed.local_ranks import free_port, run_ranks  # noqa: F401
