"""Scores of a discrete policy against labels: confusion matrix, per-class precision/recall/F1.

Pure numpy, shared by ``evaluate``, training summaries and replay-eval, so every report in the
package counts the same way. Conventions (the ones scikit-learn uses, written out here because
a report reader cannot see them): ``matrix[true, predicted]``; a class never predicted has
precision 0 (not NaN), a class never present has recall 0, and ``support`` says which is which;
macro averages run over the classes that occur in the labels only, so an action the recording
never contains does not drag the average down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from malpi_ros.errors import MalpiError


def _indices(values: Any, num_classes: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise MalpiError(f'{what} must be a 1-D array of class indices, got shape {array.shape}')
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise MalpiError(f'{what} must be integer class indices, got dtype {array.dtype}')
    array = array.astype(np.int64, copy=False)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        raise MalpiError(
            f'{what} must be in [0, {num_classes}); {int(bad.sum())} are not, e.g. '
            f'{int(array[np.argmax(bad)])}'
        )
    return array


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """int64 (num_classes, num_classes): ``[i, j]`` counts frames labelled i, predicted j."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise MalpiError(f'num_classes must be an integer >= 1, got {num_classes!r}')
    y = _indices(labels, num_classes, 'labels')
    p = _indices(predictions, num_classes, 'predictions')
    if y.shape != p.shape:
        raise MalpiError(f'labels {y.shape} and predictions {p.shape} differ in length')
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    num = np.asarray(numerator, np.float64)
    den = np.asarray(denominator, np.float64)
    out = np.zeros(np.broadcast(num, den).shape, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True, eq=False)
class ClassificationMetrics:
    """Everything a confusion matrix says, per class and overall (see the module docstring)."""

    names: tuple[str, ...]
    matrix: np.ndarray  # (A, A) int64, [true, predicted]
    precision: np.ndarray  # (A,) float64
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # (A,) int64: frames labelled with each class
    predicted: np.ndarray  # (A,) int64: frames predicted as each class
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    total: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-class entries keyed by action name, and the overall figures."""
        return {
            'total': self.total,
            'accuracy': self.accuracy,
            'macro_precision': self.macro_precision,
            'macro_recall': self.macro_recall,
            'macro_f1': self.macro_f1,
            'per_class': {
                name: {
                    'precision': float(self.precision[i]),
                    'recall': float(self.recall[i]),
                    'f1': float(self.f1[i]),
                    'support': int(self.support[i]),
                    'predicted': int(self.predicted[i]),
                }
                for i, name in enumerate(self.names)
            },
            'confusion': {'names': list(self.names), 'matrix': self.matrix.tolist()},
        }

    def format_table(self) -> str:
        """A per-class table and the overall line, for a terminal."""
        width = max(len('action'), *(len(n) for n in self.names))
        lines = [
            f'{"action":<{width}}  {"precision":>9}  {"recall":>6}  {"f1":>5}  '
            f'{"support":>7}  {"predicted":>9}'
        ]
        for i, name in enumerate(self.names):
            lines.append(
                f'{name:<{width}}  {self.precision[i]:>9.3f}  {self.recall[i]:>6.3f}  '
                f'{self.f1[i]:>5.3f}  {self.support[i]:>7d}  {self.predicted[i]:>9d}'
            )
        lines.append(
            f'accuracy {self.accuracy:.3f} over {self.total} frames; macro (classes present) '
            f'precision {self.macro_precision:.3f}, recall {self.macro_recall:.3f}, '
            f'f1 {self.macro_f1:.3f}'
        )
        return '\n'.join(lines)


def metrics_from_matrix(matrix: Any, names: Sequence[str]) -> ClassificationMetrics:
    """Per-class and overall scores of a confusion matrix ``[true, predicted]``."""
    m = np.asarray(matrix)
    names = tuple(str(n) for n in names)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise MalpiError(
            f'confusion matrix must be square with one row per name ({len(names)}), '
            f'got shape {m.shape}'
        )
    if m.size and (not np.issubdtype(m.dtype, np.integer) or (m < 0).any()):
        raise MalpiError('confusion matrix must hold counts (integers >= 0)')
    m = m.astype(np.int64, copy=False)
    hits = np.diag(m)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(m.sum())
    present = support > 0
    return ClassificationMetrics(
        names=names,
        matrix=m,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        predicted=predicted,
        accuracy=float(hits.sum() / total) if total else 0.0,
        macro_precision=float(precision[present].mean()) if present.any() else 0.0,
        macro_recall=float(recall[present].mean()) if present.any() else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        total=total,
    )


def classification_metrics(
    labels: Any, predictions: Any, names: Sequence[str]
) -> ClassificationMetrics:
    """Scores of ``predictions`` against ``labels`` (class indices into ``names``)."""
    return metrics_from_matrix(confusion_matrix(labels, predictions, len(names)), names)


@dataclass(frozen=True)
class Agreement:
    """How far two runs of the same policy over the same frames are apart.

    ``max_abs_diff``: the largest |Δprobability| over every frame and action;
    ``action_agreement``: the share of frames where both pick the same action (argmax).
    """

    frames: int
    max_abs_diff: float
    mean_abs_diff: float
    action_agreement: float
    disagreements: int

    def to_dict(self) -> dict[str, Any]:
        return {
            'frames': self.frames,
            'max_abs_diff': self.max_abs_diff,
            'mean_abs_diff': self.mean_abs_diff,
            'action_agreement': self.action_agreement,
            'disagreements': self.disagreements,
        }


def agreement(probs_a: Any, probs_b: Any) -> Agreement:
    """Compare two (N, A) probability arrays frame by frame (see ``Agreement``)."""
    a = np.asarray(probs_a, np.float64)
    b = np.asarray(probs_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise MalpiError(
            f'agreement needs two (frames, actions) arrays of one shape, got {a.shape} and '
            f'{b.shape}'
        )
    if a.shape[0] == 0:
        return Agreement(0, 0.0, 0.0, 1.0, 0)
    diff = np.abs(a - b)
    same = np.argmax(a, axis=1) == np.argmax(b, axis=1)
    return Agreement(
        frames=int(a.shape[0]),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        action_agreement=float(same.mean()),
        disagreements=int((~same).sum()),
    )
