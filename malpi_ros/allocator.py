"""glibc's allocator set up for training: freed tensor memory is reused, not unmapped.

glibc serves every allocation above its mmap threshold (128 KiB at first, raised as such
blocks are freed, to 32 MiB at most) with a fresh ``mmap`` and gives it back with ``munmap``
when freed, and it trims the heap's top back to the system once more than its trim threshold
is free there (TensorFlow's generator datasets set that to 128 KiB themselves). A training
step allocates and frees tens of megabytes of tensors (a batch of the simulator's 120-frame
windows is 28 MiB of float32, and each layer's activations as much), so each step touched
every page of them afresh: measured on the demo's training, 13 million page faults in four
epochs, a third of the CPU time in the kernel and epochs of 11-21 s where the work was the
same. With the mmap threshold fixed at its maximum and 64 MiB kept at the heap's top when it
is trimmed (``M_TOP_PAD``), the same four epochs took 2.5-4 million faults and 8-11 s each
(README "Demo: how long it takes").

Pure ctypes, Linux with glibc only; elsewhere (or where the user set glibc's own
``MALLOC_*`` / ``GLIBC_TUNABLES`` variables, which win) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters, from glibc's malloc.h.
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up
# to it come from the heap and are reused.
MMAP_THRESHOLD = 32 << 20
# What glibc keeps at the heap's top when it trims (and adds when it grows the heap): a step's
# working set stays mapped instead of being unmapped and faulted in again every step.
TOP_PAD = 64 << 20


def keep_freed_memory() -> str:
    """Set glibc's allocator to reuse freed memory (see the module docstring); a sentence on
    what was done, for the training's log."""
    if not sys.platform.startswith('linux'):
        return f'allocator: left as it is ({sys.platform} is not Linux)'
    if any(name.startswith('MALLOC_') for name in os.environ) or 'malloc' in os.environ.get(
        'GLIBC_TUNABLES', ''
    ):
        return "allocator: left as it is (glibc's MALLOC_* or GLIBC_TUNABLES is set)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 'allocator: left as it is (no mallopt: not glibc)'
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return 'allocator: glibc refused some of the settings (training runs, maybe slower)'
    return (
        f'allocator: blocks up to {MMAP_THRESHOLD >> 20} MiB reused from the heap, '
        f'{TOP_PAD >> 20} MiB kept at its top (glibc mallopt)'
    )
