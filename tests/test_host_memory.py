"""The CPU allocator setting: a freed large activation stays in the heap for reuse."""

import ctypes
import subprocess
import sys

import pytest

from megagnn.training import host_memory

PROGRAM = """
import ctypes, sys, torch
from megagnn.training.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

if sys.argv[1] == "on":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.ones(64 * 2**20 // 4)  # a 64 MB activation
del x
print(libc.mallinfo2().fordblks)  # bytes free in the heap, ready for the next step
"""


def free_in_heap(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33")
def test_freed_activation_stays_in_the_heap():
    assert free_in_heap("off") < 32 * 2**20  # by default it was mmapped and given back
    assert free_in_heap("on") >= 64 * 2**20


def test_user_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert not host_memory.keep_freed_memory()
