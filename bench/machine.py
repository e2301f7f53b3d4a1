"""The machine a benchmark ran on, printed with its figures: CPU, cores, SIMD, load.

The same benchmark gave ~10x different model figures on a machine with AVX-512 and on one
without (README, Benchmarks), and a shared machine's load moves tail latencies a lot: figures
without these facts cannot be compared.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_facts(cpuinfo: str | None = None) -> dict[str, str]:
    """Model name and SIMD extensions from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path('/proc/cpuinfo').read_text()
        except OSError:
            cpuinfo = ''
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        fields.setdefault(key.strip().lower(), value.strip())  # the first CPU's
    flags = set((fields.get('flags') or fields.get('features') or '').split())
    if 'avx512f' in flags:
        subsets = sorted(f.removeprefix('avx512') for f in flags if f.startswith('avx512'))
        avx512 = f'yes ({" ".join(subsets)})'
    else:
        avx512 = 'no'
    facts = {
        'cpu': fields.get('model name') or fields.get('hardware') or platform.processor() or '?',
        'machine': platform.machine(),
        'cores': str(os.cpu_count()),
    }
    if flags & {'asimd', 'neon'}:
        facts['simd'] = 'NEON (asimd)' + (', SVE' if 'sve' in flags else '')
    else:
        facts['simd'] = (
            f'AVX-512: {avx512}; AVX2: {"yes" if "avx2" in flags else "no"}; '
            f'FMA: {"yes" if "fma" in flags else "no"}'
        )
    return facts


def describe() -> str:
    """One line: CPU, cores, SIMD and the load average now (1 / 5 / 15 min)."""
    facts = cpu_facts()
    one, five, fifteen = os.getloadavg()
    return (
        f'{facts["cpu"]} ({facts["machine"]}), {facts["cores"]} cores, {facts["simd"]}; '
        f'load average {one:.2f} / {five:.2f} / {fifteen:.2f}'
    )


def load() -> float:
    """The 1-minute load average: more than the core count means the figures were shared."""
    return os.getloadavg()[0]
