"""The CLI's malloc setting: applied unless the user set glibc's own threshold, and it makes
a freed 512 KiB block leave the resident set (glibc's adaptive default keeps it)."""
import subprocess
import sys

from gradprobe_dist.runtime.memory import THRESHOLD_BYTES, follow_live_memory

PROBE = """
import ctypes, sys
from gradprobe_dist.runtime.memory import follow_live_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == 'on':
    follow_live_memory()
for size in (1024 * 1024, 512 * 1024):  # glibc's default raises its threshold past a freed 1 MiB block
    blocks = [libc.malloc(size) for _ in range(100 * 2**20 // size)]  # 100 MiB
    for b in blocks:
        ctypes.memset(b, 1, size)
    keep = libc.malloc(64)  # a live block above them: the heap cannot shrink from the top
    for b in blocks:
        libc.free(b)
print(rss())
"""


def resident_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    return int(out.stdout.split()[-1])


def test_user_threshold_wins():
    assert follow_live_memory({"MALLOC_MMAP_THRESHOLD_": "65536"}) is None
    assert follow_live_memory({}) == THRESHOLD_BYTES


def test_freed_blocks_leave_the_resident_set():
    kept, returned = resident_after_free("off"), resident_after_free("on")
    assert kept - returned > 80 * 2**20, (kept, returned)
