"""keep_freed_memory: large blocks come from the heap and stay there once freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_large_blocks_are_no_longer_mapped_one_by_one():
    # A child process, so that the test runner's own allocator keeps its defaults.
    script = textwrap.dedent(
        """
        import ctypes
        from server.host_memory import keep_freed_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        size = 16 << 20

        def mapped_while_held():
            block = libc.malloc(size)
            mapped = libc.mallinfo2().hblkhd
            libc.free(block)
            return mapped

        before = mapped_while_held()
        assert keep_freed_memory() is True
        after = mapped_while_held()
        heap_after_free = libc.mallinfo2().arena
        print(before, after, heap_after_free)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after, heap = map(int, out.stdout.split())
    assert before >= 16 << 20  # glibc's default: a block this large gets its own mapping
    assert after < 16 << 20  # now it comes from the heap ...
    assert heap >= 16 << 20  # ... and the heap keeps it after it is freed


def test_no_mallopt_is_not_an_error(monkeypatch):
    from server import host_memory

    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no libc")))
    assert host_memory.keep_freed_memory() is False
