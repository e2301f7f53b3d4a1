"""The robot's runtime: the LiteRT step model (XNNPACK), with no TensorFlow in the process.

A LiteRT-only process peaks at ~110-150 MB and imports in ~0.2 s, one that imports TensorFlow at
~1.3 GB and ~4.5 s (DESIGN §2), so nothing here (or in what it imports) may touch TensorFlow.
Tensors are matched through the model's signature by name (``frame, h, c`` ->
``probs, h_next, c_next``): tensor names are ``StatefulPartitionedCall:N`` and h and c share a
shape, so neither tensor names nor shapes can tell them apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from malpi_ros.errors import BundleError, ConfigError

SIGNATURE = 'serving_default'
AUTO_THREADS = 0  # num_threads: derive from the cores (auto_threads)
INPUTS = ('frame', 'h', 'c')
OUTPUTS = ('probs', 'h_next', 'c_next')


def auto_threads(cores: int | None = None) -> int:
    """Interpreter threads for ``num_threads=0``: one per core, from 1 to 4.

    The calling thread is one of them (XNNPACK's pool adds ``num_threads - 1`` workers). Seen on
    a 2-core machine under load from other jobs (README, Benchmarks): 2 threads stepped faster
    in the node than 1 (median 3.1 vs 3.6 ms over 3 runs each) with tails alike; a Pi's 4 cores
    give 4. Capped at 4: more was not measured, and batch-1 work on this model splits into few
    parts.
    """
    if cores is None:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class LiteRTStep:
    """One step of the policy: ``run(frame, h, c) -> (probs, h_next, c_next)`` as numpy arrays.

    Not thread-safe (one interpreter, one set of tensors): ``Policy`` serializes calls.
    """

    name = 'litert'

    def __init__(self, path: str | Path, *, num_threads: int = AUTO_THREADS) -> None:
        self.path = Path(path)
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ConfigError(
                f'num_threads must be an integer >= 0 (0 = auto), got {num_threads!r}'
            )
        self.num_threads = num_threads or auto_threads()
        try:
            self._interpreter = Interpreter(
                model_path=str(self.path), num_threads=self.num_threads
            )
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as err:
            raise BundleError(f'{self.path}: not a loadable LiteRT model: {err}') from err
        self._inputs, self._outputs = self._match_signature()
        frame = self._inputs['frame']['shape']
        if len(frame) != 4:
            raise BundleError(
                f'{self.path}: input frame has shape {list(frame)}, not (1, H, W, C)'
            )
        self.frame_shape: tuple[int, ...] = tuple(int(d) for d in frame[1:])
        self.units = int(self._inputs['h']['shape'][-1])
        self.num_actions = int(self._outputs['probs']['shape'][-1])
        self._check_shapes()
        self._in = {name: self._inputs[name]['index'] for name in INPUTS}
        self._out = {name: self._outputs[name]['index'] for name in OUTPUTS}

    def _match_signature(self) -> tuple[dict[str, Any], dict[str, Any]]:
        signatures = self._interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise BundleError(
                f'{self.path}: no {SIGNATURE!r} signature (found {sorted(signatures)}); '
                'the step model must be exported by malpi_ros.learn.export'
            )
        # The runner holds a reference to the interpreter's internals, which makes invoke()
        # refuse to run: take the tensor details and drop it.
        runner = self._interpreter.get_signature_runner(SIGNATURE)
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        del runner
        for kind, found, wanted in (('inputs', inputs, INPUTS), ('outputs', outputs, OUTPUTS)):
            if sorted(found) != sorted(wanted):
                raise BundleError(
                    f'{self.path}: signature {kind} are {sorted(found)}, expected {list(wanted)}'
                )
        # invoke() runs the primary subgraph: the signature must be it.
        primary = {d['index'] for d in self._interpreter.get_input_details()}
        if {d['index'] for d in inputs.values()} != primary:
            raise BundleError(f'{self.path}: signature {SIGNATURE!r} is not the primary graph')
        return inputs, outputs

    def _check_shapes(self) -> None:
        want = {
            'frame': (1, *self.frame_shape),
            'h': (1, self.units),
            'c': (1, self.units),
            'probs': (1, self.num_actions),
            'h_next': (1, self.units),
            'c_next': (1, self.units),
        }
        for name, detail in {**self._inputs, **self._outputs}.items():
            shape = tuple(int(d) for d in detail['shape'])
            if shape != want[name] or detail['dtype'] != np.float32:
                raise BundleError(
                    f'{self.path}: tensor {name} is {np.dtype(detail["dtype"]).name}{list(shape)}'
                    f', expected float32{list(want[name])}'
                )

    def describe(self) -> dict[str, Any]:
        """The I/O description the bundle metadata records (and the loader checks)."""
        return {
            'signature': SIGNATURE,
            'inputs': {n: _describe(self._inputs[n]) for n in INPUTS},
            'outputs': {n: _describe(self._outputs[n]) for n in OUTPUTS},
        }

    def run(
        self, frame: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """frame (1, H, W, C), h and c (1, units) float32 -> probs (A,), h_next, c_next."""
        self._interpreter.set_tensor(self._in['frame'], np.ascontiguousarray(frame, np.float32))
        return self._invoke(h, c)

    def run_with(
        self, fill: Callable[[np.ndarray], object], h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``run``, but ``fill(buffer)`` writes the (H, W, C) float32 frame straight into the
        interpreter's input tensor: no frame array allocated and copied per step."""
        buffer = self._interpreter.tensor(self._in['frame'])()[0]
        try:
            fill(buffer)
        finally:
            del buffer  # invoke() refuses to run while a view of the tensors is alive
        return self._invoke(h, c)

    def _invoke(self, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        interp = self._interpreter
        interp.set_tensor(self._in['h'], np.ascontiguousarray(h, np.float32))
        interp.set_tensor(self._in['c'], np.ascontiguousarray(c, np.float32))
        interp.invoke()
        # get_tensor copies: the results stay valid after the next invoke() (the state is
        # 2 x 512 bytes; a view would be overwritten under the Policy's feet).
        return (
            interp.get_tensor(self._out['probs'])[0],
            interp.get_tensor(self._out['h_next']),
            interp.get_tensor(self._out['c_next']),
        )


def _describe(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        'shape': [int(d) for d in detail['shape']],
        'dtype': np.dtype(detail['dtype']).name,
    }
