"""Training past one device: ``tf.distribute`` strategies under Keras ``fit``.

``train.distribute`` (``--distribute``): ``none`` (one process, its default device),
``mirrored`` (``MirroredStrategy``: this machine's GPUs, one replica each) or ``multi-worker``
(``MultiWorkerMirroredStrategy``: the machines that the standard ``TF_CONFIG`` variable names,
each with its own replicas). The configured batch is the global batch: each replica gets
``batch_size / replicas``, so one config trains the same model on one machine or many.

Each worker reads the recordings itself (shared storage, its own frame cache) and trains on
its own share of the training episodes (``dataset.share_by_episode``): no window or chunk is
seen by two workers in an epoch. Every worker runs the same number of steps per epoch (the
collective ops need all of them in every step): shorter shares are padded with batches of
weight 0. The carried-state recipe keeps each replica's lanes on that replica, so the state a
replica carries is always that of its own lanes.

Keras 3.15 does not run ``fit`` under ``MultiWorkerMirroredStrategy`` as shipped
(keras-team/keras#20585): it reduces the first batch across workers to learn its shapes, and
the scalar logs of every step with ``axis=0``; both fail. ``ReplicaFit`` and ``replica_logs``
are the two small fixes, used by both trainers; the two-worker test fails without them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malpi_ros.config import ModelConfig
from malpi_ros.errors import ConfigError
from malpi_ros.learn.dataset import share_by_episode
from malpi_ros.learn.model import SEQUENCE_INPUT, build_carried_model
from malpi_ros.learn.pipeline import (
    ChunkSource,
    WindowSource,
    replica_chunk_dataset,
    replica_window_dataset,
)


@dataclass(frozen=True)
class Placement:
    """Where this process trains: worker ``worker`` of ``workers``, with ``replicas`` local
    replicas (devices); ``chief`` writes the bundle, the backup and the reports."""

    workers: int = 1
    worker: int = 0
    replicas: int = 1
    chief: bool = True

    def __post_init__(self) -> None:
        if not (self.workers >= 1 and 0 <= self.worker < self.workers and self.replicas >= 1):
            raise ConfigError(
                f'placement needs workers >= 1, 0 <= worker < workers and replicas >= 1, got '
                f'workers={self.workers}, worker={self.worker}, replicas={self.replicas}'
            )

    @property
    def total_replicas(self) -> int:
        return self.workers * self.replicas

    def describe(self) -> str:
        role = 'chief' if self.chief else 'not the chief: writes nothing at --out'
        return (
            f'worker {self.worker} of {self.workers} ({role}), {self.replicas} replica(s) here, '
            f'{self.total_replicas} in all'
        )


ONE_PROCESS = Placement()


def make_strategy(mode: str) -> tf.distribute.Strategy | None:
    """The strategy of ``train.distribute`` (None for ``none``). Call it first: a
    multi-worker strategy must be made before TensorFlow runs anything in the process."""
    if mode == 'none':
        return None
    if mode == 'mirrored':
        return tf.distribute.MirroredStrategy()
    if mode == 'multi-worker':
        config = os.environ.get('TF_CONFIG', '')
        try:
            cluster = json.loads(config)['cluster'] if config else None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f'TF_CONFIG is not a cluster description: {err}') from err
        if not cluster:
            raise ConfigError(
                'distribute multi-worker needs TF_CONFIG (the cluster and this task), '
                'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f'distribute must be none, mirrored or multi-worker, got {mode!r}')


def placement(strategy: tf.distribute.Strategy | None) -> Placement:
    """This process's place in ``strategy``: the worker id is TensorFlow's own input
    pipeline id (a ``chief`` task first, then the ``worker`` tasks in order)."""
    if strategy is None:
        return Placement()
    resolver = getattr(strategy, 'cluster_resolver', None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs = len(spec.get('chief', []))
    workers = max(1, chiefs + len(spec.get('worker', [])))
    worker = 0
    if resolver is not None and resolver.task_type == 'worker':
        worker = chiefs + int(resolver.task_id)
    return Placement(
        workers=workers,
        worker=worker,
        replicas=strategy.num_replicas_in_sync // workers,
        chief=bool(strategy.extended.should_checkpoint),
    )


def scope(strategy: tf.distribute.Strategy | None) -> contextlib.AbstractContextManager[Any]:
    """Where models, optimizers and metrics are made: the strategy's scope, or nothing."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def gpu_present() -> bool:
    return bool(tf.config.list_physical_devices('GPU'))


def replica_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """A training step's logs as Keras 3.15 can reduce them across workers: it reduces them
    with ``axis=0`` (keras-team/keras#20585), so under a multi-worker strategy each gets a
    leading axis of 1. The epoch's logs are read from the metrics, as scalars, either way."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, (1,)) for name, value in logs.items()}
    return logs


class ReplicaFit:
    """Mixin for a ``keras.Model`` trained under any strategy (see ``replica_logs``)."""

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        """Keras builds metrics and optimizer from the shapes of a first batch, which it gets
        by averaging the batch over all replicas: under a multi-worker strategy that reduction
        fails (keras-team/keras#20585). One replica's batch has the same shapes."""
        strategy = getattr(self, '_distribute_strategy', None)
        if strategy is None or iterator is None:
            super()._maybe_symbolic_build(iterator, data_batch)  # type: ignore[misc]
            return
        if _built(self):
            # Keras asks again at every evaluate, i.e. every epoch's validation: the batch
            # would cost a distributed iterator of its own (~0.1 s of CPU) and a batch load.
            return
        for _, _, batches in iterator:
            data_batch = keras.tree.map_structure(
                lambda v: (
                    strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                next(batches),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)  # type: ignore[attr-defined]


def _built(model: Any) -> bool:
    """Whether Keras' symbolic build has nothing left to build (its own four checks)."""
    metrics, loss = model._compile_metrics, model._compile_loss
    return (
        all(layer.built for layer in model._flatten_layers())
        and (metrics is None or metrics.built)
        and (loss is None or loss.built)
        and (model.optimizer is None or model.optimizer.built)
    )


class WindowTrainer(ReplicaFit, keras.Model):
    """Fits ``sequence_model`` on window batches ``(x, y, sample_weight)`` with Keras' own
    steps (the ``zero`` recipe), under any strategy or none.

    ``forward_only`` > 0 (``DatasetConfig.bptt``; ``cfg`` needed): in training, a window's
    first ``forward_only`` frames run through the model's own layers (``build_carried_model``)
    outside the gradient, and their final state, held constant, starts the rest. The outputs
    are the sequence model's; the backward pass skips those frames. Inference (validation,
    prediction) runs the sequence model whole.
    """

    def __init__(
        self, sequence_model: keras.Model, cfg: ModelConfig | None = None, forward_only: int = 0
    ) -> None:
        super().__init__(name='window_trainer')
        self.net = sequence_model
        self.forward_only = forward_only
        if forward_only:
            if cfg is None:
                raise ConfigError('forward-only frames need the model config (cfg)')
            self.units = cfg.lstm_units
            self.carried = build_carried_model(cfg, sequence_model)
        self.built = True  # every weight exists now (save and restore need it)

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not (training and self.forward_only):
            return self.net(inputs, training=training)
        cut = self.forward_only
        zero = tf.zeros((tf.shape(inputs)[0], self.units), inputs.dtype)
        head = self.carried(
            {SEQUENCE_INPUT: inputs[:, :cut], 'h': zero, 'c': zero}, training=training
        )
        tail = self.carried(
            {
                SEQUENCE_INPUT: inputs[:, cut:],
                'h': tf.stop_gradient(head['h_next']),
                'c': tf.stop_gradient(head['c_next']),
            },
            training=training,
        )
        return tf.concat([tf.stop_gradient(head['probs']), tail['probs']], axis=1)

    def train_step(self, data: Any) -> dict[str, Any]:
        return replica_logs(super().train_step(data))

    def test_step(self, data: Any) -> dict[str, Any]:
        return replica_logs(super().test_step(data))


def shares(source: ChunkSource | WindowSource, workers: int) -> list[list[int]]:
    """Each worker's episodes of ``source`` (``dataset.share_by_episode``)."""
    return share_by_episode([len(e) for e in source.episodes], workers)


def worker_sources(
    source: ChunkSource | WindowSource, where: Placement, batch_size: int, training: bool = True
) -> list[ChunkSource] | list[WindowSource]:
    """``source`` cut into every worker's share (all workers' shares: each worker pads its
    epoch to the longest). Carried lanes: each worker gets its replicas' part of the batch.
    Validation windows (``zero``, not ``training``) are dealt window by window, as many to
    every replica (the last fewer than the replicas left out): no padding row then dilutes the
    mean that ``val_loss`` is, and it means what one process's means."""
    if isinstance(source, WindowSource) and not training:
        total = where.total_replicas
        keep = len(source) - len(source) % total if len(source) >= total else len(source)
        return [source.take(np.arange(keep)[w :: where.workers]) for w in range(where.workers)]
    parts = shares(source, where.workers)
    if isinstance(source, ChunkSource):
        lanes = batch_size // where.workers
        return [source.subset(share, lanes) for share in parts]
    return [source.subset(share) for share in parts]


def distributed_dataset(
    strategy: tf.distribute.Strategy,
    source: ChunkSource | WindowSource,
    where: Placement,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
) -> Any:
    """This worker's share of ``source`` as the strategy's per-replica batches."""
    sources = worker_sources(source, where, batch_size, training=shuffle)
    per_replica = batch_size // where.total_replicas

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        if (context.num_input_pipelines, context.input_pipeline_id) != (
            where.workers,
            where.worker,
        ):
            raise ConfigError(
                f'tf.distribute sees input pipeline {context.input_pipeline_id} of '
                f'{context.num_input_pipelines}, the cluster description worker '
                f'{where.worker} of {where.workers}'
            )
        if isinstance(source, ChunkSource):
            return replica_chunk_dataset(
                sources,  # type: ignore[arg-type]
                where.worker,
                where.replicas,
                shuffle=shuffle,
                seed=seed,
            )
        return replica_window_dataset(
            sources,  # type: ignore[arg-type]
            where.worker,
            where.replicas,
            per_replica,
            shuffle=shuffle,
            seed=seed,
        )

    # Prefetching each batch to the replica's device pays on a GPU; on a CPU the batch is
    # already where the step runs, and tf.distribute's MultiDeviceIterator that does it kept
    # batches from loading while the previous step computed (measured: 1.93x plain fit an
    # epoch on one worker, the steps themselves equal; 0.93x without it).
    options = tf.distribute.InputOptions(experimental_fetch_to_device=gpu_present())
    return strategy.distribute_datasets_from_function(dataset_fn, options=options)


def check_split(source: ChunkSource | WindowSource, where: Placement, batch_size: int) -> str:
    """Refuse what cannot be split (one line each), before any training: a batch that does
    not divide among the replicas, a worker without training episodes; else a note on the
    split for the log."""
    if batch_size % where.total_replicas:
        raise ConfigError(
            f'batch_size {batch_size} (the global batch) does not divide among '
            f'{where.total_replicas} replicas ({where.workers} worker(s) x {where.replicas}); '
            f'use a multiple of {where.total_replicas}'
        )
    parts = shares(source, where.workers)
    empty = [w for w, share in enumerate(parts) if not share]
    if empty:
        raise ConfigError(
            f'{len(source.episodes)} training episodes cannot be shared among {where.workers} '
            f'workers (worker {empty[0]} would have none): train on fewer workers or record '
            'more drives'
        )
    frames = [sum(len(source.episodes[i]) for i in share) for share in parts]
    return (
        f'{where.describe()}; training episodes shared by episode: '
        + ', '.join(f'worker {w} {len(p)} ({f} frames)' for w, (p, f) in enumerate(
            zip(parts, frames, strict=True)))
        + f'; {batch_size // where.total_replicas} per replica of the global batch {batch_size}'
    )  # fmt: skip
