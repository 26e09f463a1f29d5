"""The engine's C++ kernels (`decode_attention.cpp`, `lone_row.cpp`), compiled for this CPU at start-up and loaded.

Built with the C++ compiler inductor uses, `-march=native`, into a temporary directory at every start (under a second
each), since a cached library could be loaded by another CPU. Loading one leaves the process's floating-point state
alone (no flush-to-zero: see `COMPILE_FLAGS`). Threads: OpenMP, in the runtime torch already loaded.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch._inductor.cpp_builder import get_cpp_compiler  # underscored, but torch is pinned

log = logging.getLogger(__name__)

# Compiled with -ffast-math (glibc's vectorised expf needs it), linked without it: linking with it adds gcc's
# crtfastmath.o, whose constructor turns on flush-to-zero for the whole process (torch's arithmetic included).
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")


def build(source: Path, defines: Sequence[str], what: str, instead: str) -> ctypes.CDLL | None:
    """Compile `source` (with `-D` `defines`) and load it; None where there is no compiler or the build fails, with a
    warning naming `what` it is and what runs `instead`."""
    try:
        compiler = get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - inductor's InvalidCxxCompiler, or whatever its probe raises
        log.warning("no C++ compiler for %s (%s); %s", what, exc, instead)
        return None
    with tempfile.TemporaryDirectory(prefix="reft-kernel-") as tmp:
        objects, library = Path(tmp) / f"{source.stem}.o", Path(tmp) / f"{source.stem}.so"
        for command in ([compiler, *COMPILE_FLAGS, *(f"-D{d}" for d in defines), str(source), "-o", str(objects)],
                        [compiler, *LINK_FLAGS, str(objects), "-o", str(library), "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("could not build %s (%s exited %d: %s); %s", what, compiler, done.returncode,
                            done.stderr.strip()[-500:], instead)
                return None
        return ctypes.CDLL(str(library))  # mapped: the file may go
