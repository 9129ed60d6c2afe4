"""The CLI's malloc setting: applied unless the user set glibc's own threshold (its effect on
peak RSS is measured by bench/main_memory.py, not asserted here: it depends on the heap's
history)."""
import platform

from gradprobe_dist.runtime.memory import THRESHOLD_BYTES, follow_live_memory, return_freed_memory


def test_user_threshold_wins():
    assert follow_live_memory({"MALLOC_MMAP_THRESHOLD_": "65536"}) is None
    expected = THRESHOLD_BYTES if platform.libc_ver()[0] == "glibc" else None
    assert follow_live_memory({}) == expected


def test_glibc_accepts_the_thresholds():
    assert return_freed_memory(1 << 20) == (platform.libc_ver()[0] == "glibc")
