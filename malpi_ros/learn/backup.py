"""Resume a killed training run from its last finished epoch (``--backup-dir``).

``TrainingBackup`` is Keras' ``BackupAndRestore`` made safe for our runs: after every epoch the
chief (the only process of a run that writes, ``learn.distribute``) saves the model with its
optimizer state, the best epoch's weights and value, early stopping's count and the history,
each file written beside its final name and renamed into place, ``state.json`` last: a run
killed while saving resumes from the previous epoch, never from half a file. Every worker of a
restarted run reads the same backup (it lies on storage all workers see, as the recordings
do), so all resume at the same epoch. A backup made with other settings (model, data, recipe;
the epoch count may change) is not resumed: the run starts over and says so. ``train`` removes
the backup once the bundle is written (``_Backup.remove``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from malpi_ros import diskspace
from malpi_ros.errors import ConfigError

STATE_FILE = 'state.json'
HISTORY_FILE = 'history.csv'


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings a backup is only valid for (JSON, keys sorted)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_state(backup_dir: Path) -> dict[str, Any] | None:
    """The committed state of a backup, or None when there is none (or it is unreadable)."""
    try:
        state = json.loads((backup_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get('epoch'), int) else None


def _replace(tmp: Path, final: Path) -> None:
    """Move a finished file into place: a reader sees the old file or the new one."""
    with tmp.open('rb') as f:
        os.fsync(f.fileno())
    tmp.replace(final)


def _save_arrays(path: Path, arrays: Sequence[Any]) -> None:
    """``arrays`` in ``path`` (.npz), written beside it and renamed into place. numpy, not
    HDF5: on a full disk h5py crashed the process (SIGSEGV) where numpy raises OSError."""
    tmp = path.with_name(f'.{path.name}.tmp.npz')
    np.savez(tmp, *[np.asarray(a) for a in arrays])
    _replace(tmp, path)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f'arr_{i}'] for i in range(len(saved.files))]


class TrainingBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore with atomic files, a chief that alone writes, and the state of
    our own callbacks (best epoch, early stopping, history) saved with the weights."""

    def __init__(
        self,
        backup_dir: Path,
        *,
        writer: bool,
        settings: str,
        best: Any,
        stopper: keras.callbacks.EarlyStopping,
        log: Callable[[str], None],
    ) -> None:
        super().__init__(str(backup_dir), delete_checkpoint=False)
        self.dir = Path(backup_dir)
        self.writer = writer
        self.settings = settings
        self.best = best
        self.stopper = stopper
        self.log = log
        state = read_state(self.dir)
        if state is not None and state.get('settings') != settings:
            log(
                f'backup {self.dir} is of a run with other settings: not resumed, '
                'training starts at epoch 1 (and replaces it)'
            )
            state = None
        self.state = state
        self.resumed_at = state['epoch'] if state is not None else 0

    @property
    def history_path(self) -> Path:
        """The history as CSV, kept with the backup so a resumed run's history is whole."""
        return self.dir / HISTORY_FILE

    def keep_history(self) -> None:
        """Cut the backup's history to the epochs the backup holds (an epoch logged but not
        saved runs again), before the CSV logger opens it to append."""
        path = self.history_path
        if self.state is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a fresh run, or another run's backup
            return
        with contextlib.suppress(FileNotFoundError):
            lines = path.read_text().splitlines(keepends=True)
            path.write_text(''.join(lines[: 1 + self.resumed_at]))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.state is None:
            return
        state = self.state
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = self._variables()
        arrays = _load_arrays(self.dir / state['weights'])
        if len(arrays) != len(variables):
            raise ConfigError(
                f'backup {self.dir}: {len(arrays)} arrays for {len(variables)} variables; '
                'remove it (or pass --no-backup) to start over'
            )
        for variable, array in zip(variables, arrays, strict=True):
            variable.assign(array)
        model._initial_epoch = state['epoch']  # how Keras' own BackupAndRestore resumes
        best = state['best']
        if best['file'] is not None:
            self.best.weights = _load_arrays(self.dir / best['file'])
            self.best.best, self.best.best_epoch = best['value'], best['epoch']
        stop = state['early_stopping']
        self.stopper.wait, self.stopper.best = stop['wait'], stop['best']
        self.stopper.best_epoch = stop['best_epoch']
        self.log(
            f'resumed from the backup in {self.dir}: epoch {state["epoch"]} was the last '
            f'finished, training goes on at epoch {state["epoch"] + 1}'
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.writer:
            return
        with diskspace.full_disk_is_one_line(
            f'--backup-dir {self.dir} (or train with --no-backup)'
        ):
            self._save(epoch)

    def _save(self, epoch: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        done = epoch + 1
        weights = f'epoch-{done}.npz'
        _save_arrays(self.dir / weights, [v.numpy() for v in self._variables()])
        best_file = None
        if self.best.weights is not None:
            best_file = f'epoch-{done}.best.npz'
            _save_arrays(self.dir / best_file, self.best.weights)
        stop_best = self.stopper.best
        state = {
            'epoch': done,
            'settings': self.settings,
            'weights': weights,
            'best': {
                'file': best_file,
                'value': float(self.best.best),
                'epoch': int(self.best.best_epoch),
            },
            'early_stopping': {
                'wait': int(self.stopper.wait),
                'best': None if stop_best is None else float(stop_best),
                'best_epoch': int(self.stopper.best_epoch),
            },
        }
        tmp = self.dir / f'.{STATE_FILE}.tmp'
        tmp.write_text(json.dumps(state, indent=1))
        _replace(tmp, self.dir / STATE_FILE)
        keep = {STATE_FILE, HISTORY_FILE, weights, best_file}
        for old in self.dir.iterdir():
            if old.name not in keep and old.name.startswith('epoch-'):
                old.unlink()

    def _variables(self) -> list[Any]:
        """The model's weights and the optimizer's (Adam's moments, its step count)."""
        optimizer = self.model.optimizer
        return [*self.model.weights, *(optimizer.variables if optimizer is not None else [])]

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Kept until the bundle is written (``remove``): a crash writing it resumes here."""
