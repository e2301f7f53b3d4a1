"""The YAML settings file shared by `malpi-ros train` and `malpi-ros inspect`.

Sections ``model``, ``preprocess``, ``actions``, ``dataset`` and ``train`` hold the fields of
the dataclasses in ``malpi_ros.config`` (see config/train_example.yaml), ``policy`` the rest of
``PolicyConfig`` (``window``); command-line flags override them. One reader, so a file that
trains is a file that inspects the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from malpi_ros.config import (
    ActionTable,
    DatasetConfig,
    ModelConfig,
    PolicyConfig,
    PreprocessConfig,
    TrainConfig,
    from_dict,
)
from malpi_ros.errors import ConfigError

SECTIONS = ('policy', 'model', 'preprocess', 'actions', 'dataset', 'train')
SIZE_KEYS = ('height', 'width', 'channels')


def read_config_file(path: Path | None) -> dict[str, dict[str, Any]]:
    """The sections of a YAML settings file ({} for each absent one); unknown ones are errors."""
    if path is None:
        return {name: {} for name in SECTIONS}
    import yaml  # only --config needs it

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f'cannot read config {path}: {err}') from err
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} must be a mapping, got {type(data).__name__}')
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f'config {path}: unknown sections {unknown}; known: {list(SECTIONS)}')
    sections = {}
    for name in SECTIONS:
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f'config {path}: section {name} must be a mapping, got {value!r}')
        sections[name] = dict(value)
    return sections


def build_configs(
    sections: dict[str, dict[str, Any]], overrides: dict[str, Any], where: str = 'config'
) -> tuple[PolicyConfig, DatasetConfig, TrainConfig]:
    """Policy, dataset and train configs from file sections plus command-line overrides."""
    model = dict(sections['model'])
    preprocess = dict(sections['preprocess'])
    for key in ('height', 'width'):
        if overrides.get(key) is not None:
            model[key] = preprocess[key] = overrides[key]
    for key in SIZE_KEYS:  # one side given: the other follows
        if key in model and key not in preprocess:
            preprocess[key] = model[key]
        elif key in preprocess and key not in model:
            model[key] = preprocess[key]
    dataset = dict(sections['dataset'])
    for key in ('state', 'seq_len', 'burn_in', 'stride', 'bptt'):
        if overrides.get(key) is not None:
            dataset[key] = overrides[key]
    train = dict(sections['train'])
    for key in (
        'epochs',
        'batch_size',
        'learning_rate',
        'val_fraction',
        'seed',
        'patience',
        'min_epochs',
        'class_weighting',
        'target_val_accuracy',
        'distribute',
        'xla',
    ):
        if overrides.get(key) is not None:
            train[key] = overrides[key]
    try:
        actions = from_dict(ActionTable, sections['actions'])
        model.setdefault('num_actions', len(actions))
        kind = dict(sections['policy'])
        if overrides.get('window') is not None:
            kind['window'] = overrides['window']
        unknown = sorted(set(kind) - {'window'})
        if unknown:
            raise ConfigError(f"policy: unknown keys {unknown}; known: ['window']")
        policy = PolicyConfig(
            model=from_dict(ModelConfig, model),
            preprocess=from_dict(PreprocessConfig, preprocess),
            actions=actions,
            **kind,
        )
        return policy, from_dict(DatasetConfig, dataset), from_dict(TrainConfig, train)
    except ConfigError as err:
        raise ConfigError(f'{where}: {err}') from err
