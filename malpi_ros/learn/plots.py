"""PNG figures for people: learning curves of a training run and confusion matrices.

matplotlib is imported when a figure is made (``malpi_ros.figures``), so importing this module
costs nothing and works on a headless robot or CI machine with no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from malpi_ros.errors import ConfigError
from malpi_ros.figures import figure


def plot_confusion(
    matrix: np.ndarray, names: Sequence[str], path: str | Path, title: str = ''
) -> Path:
    """Write a confusion matrix (rows: true action, columns: predicted) as a PNG at ``path``.

    Cells show counts; the colour is the share of the row (recall per true action), so a rare
    action's mistakes are as visible as a common one's. Returns ``path``.
    """
    matrix = np.asarray(matrix)
    n = len(names)
    if matrix.shape != (n, n):
        raise ConfigError(
            f'confusion matrix must be {n}x{n} for {n} action names, got shape {matrix.shape}'
        )
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = 1.6 + 0.7 * n
    with figure(path, figsize=(size + 1.0, size)) as (fig, ax):
        image = ax.imshow(share, cmap='Blues', vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='share of true action')
        ax.set_xticks(range(n), labels=list(names), rotation=45, ha='right')
        ax.set_yticks(range(n), labels=list(names))
        ax.set_xlabel('predicted')
        ax.set_ylabel('true')
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                text = f'{value:g}' if np.issubdtype(matrix.dtype, np.floating) else str(value)
                ax.text(
                    j,
                    i,
                    text,
                    ha='center',
                    va='center',
                    color='white' if share[i, j] > 0.5 else 'black',
                    fontsize=9,
                )
        total = matrix.sum()
        accuracy = np.trace(matrix) / total if total else float('nan')
        ax.set_title(f'{title}\naccuracy {accuracy:.3f} of {total:g}'.strip())
    return Path(path)


def plot_history(
    history: Mapping[str, Sequence[float]], path: str | Path, title: str = ''
) -> Path:
    """Write learning curves (loss and accuracy, training and validation) as a PNG at ``path``.

    ``history`` is Keras' ``History.history`` (or history.csv's columns): ``loss``,
    ``val_loss``, ``accuracy``, ``val_accuracy``; whichever are present are drawn. A long flat
    stretch before the loss drops is the memory plateau of DESIGN §4.
    """
    with figure(path, nrows=1, ncols=2, figsize=(10, 4)) as (fig, (ax_loss, ax_acc)):
        for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
            for prefix, style in (('', '-'), ('val_', '--')):
                values = history.get(prefix + key)
                if values is None or len(values) == 0:
                    continue
                epochs = np.arange(1, len(values) + 1)
                label = 'validation' if prefix else 'training'
                ax.plot(epochs, values, style, marker='o', markersize=3, label=label)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel('epoch')
            ax.set_ylabel(key)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        ax_acc.set_ylim(0.0, 1.02)
        if title:
            fig.suptitle(title)
    return Path(path)
