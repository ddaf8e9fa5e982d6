"""Jobs for tests of the worker processes, importable there by name."""

from __future__ import annotations

import ctypes


def hold_the_gil(seconds: int) -> int:
    """Sleep in C without releasing the GIL (libc's sleep called through PyDLL): like a C
    parser stuck on hostile input, no Python code of the process can run meanwhile."""
    return int(ctypes.PyDLL(None).sleep(seconds))
