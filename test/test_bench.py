"""The benchmarks' machine line: which SIMD the CPU has changes the figures ~10x, so it must be
read right from /proc/cpuinfo on both kinds of CPU we run on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / 'bench'

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse4_1 sse4_2 avx fma avx2 {extra}

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse4_1 sse4_2 avx fma avx2 {extra}
"""

ARM = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
"""


def _machine():
    spec = importlib.util.spec_from_file_location('bench_machine', BENCH / 'machine.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_facts_tell_avx512_avx2_and_neon_apart():
    machine = _machine()
    plain = machine.cpu_facts(X86.format(extra=''))
    assert plain['cpu'] == 'AMD EPYC'
    assert plain['simd'] == 'AVX-512: no; AVX2: yes; FMA: yes'
    wide = machine.cpu_facts(X86.format(extra='avx512f avx512bw avx512vl'))
    assert wide['simd'].startswith('AVX-512: yes (bw f vl)')
    arm = machine.cpu_facts(ARM)
    assert arm['simd'] == 'NEON (asimd)'
    assert int(plain['cores']) >= 1
    line = machine.describe()
    assert 'cores' in line and 'load average' in line
