"""malpi-ros inspect my_drive_bag/ [other_bag.mcap ...] [--json]

Summarize rosbag2 recordings before training on them: per bag, its topics with types, counts,
rates and gaps (the largest, and how many are longer than the dataset's episode gap), the
camera's frame sizes and encodings (from the first few frames), and the action histogram the
training labels would have (commands aligned to frame times as training does, without decoding
the images) and, for a recording with the motor driver's ``~/applied`` (which training then
labels from), the teleop takeovers per episode: how many, and how long each. Exits non-zero,
naming the bag, when a bag is unreadable, lacks a camera or command topic, or has no camera
frame that decodes; each error is printed once, on stderr. A bag its recorder did not finish:
`malpi-ros recover BAG` first.

--config reads the settings file `malpi-ros train` reads (malpi_ros.config_file); its
``dataset:`` and ``actions:`` sections set the labelling rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from malpi_ros.bagio import reader as bagio
from malpi_ros.config import ActionTable, DatasetConfig, from_dict, to_dict
from malpi_ros.config_file import build_configs, read_config_file
from malpi_ros.errors import BagError, DatasetError, DecodeError
from malpi_ros.learn.dataset import (
    align_labels,
    split_episodes,
    takeover_flags,
    takeover_runs,
    training_units,
)

SAMPLE_FRAMES = 5  # image messages decoded per bag to report sizes and encodings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', metavar='BAG', help='rosbag2 directory or .mcap file')
    parser.add_argument('--json', action='store_true', help='print one JSON document')
    parser.add_argument('--image-topic', help='camera topic (default: the one image topic)')
    parser.add_argument('--cmd-topic', help='command topic (default: the one Twist topic)')
    parser.add_argument(
        '--config',
        type=Path,
        help='the settings file of malpi-ros train (its dataset: and actions: sections)',
    )


def inspect_bag(
    path: str | Path,
    dataset: DatasetConfig,
    table: ActionTable,
    image_topic: str | None = None,
    cmd_topic: str | None = None,
) -> dict[str, Any]:
    """A JSON-ready report of one bag; ``error`` is set when it cannot be used for training.

    Raises BagError only when the bag cannot be read at all.
    """
    with bagio.open_bag(path) as bag:
        try:
            topics: bagio.Topics | None = bagio.find_topics(bag, image_topic, cmd_topic)
            topic_error = None
        except BagError as err:
            topics, topic_error = None, str(err)
        commands: list[tuple[float, float, float, int]] = []
        samples: list[Any] = []
        probe = _DecodeProbe(bag)

        def collect(topic: str, t_ns: int, raw: Any) -> None:
            if topics is None:
                return
            if topic == topics.cmd_topic:
                commands.append((t_ns * 1e-9, *bagio.command_of(bag.deserialize(raw, topic))))
            elif topic == topics.image_topic:
                if len(samples) < SAMPLE_FRAMES:
                    samples.append(raw)
                probe.offer(raw, topic)

        summary = bagio.summarize_open(bag, collect)
        images = _image_formats(bag, topics, samples)

    report: dict[str, Any] = {
        'bag': str(path),
        'storage': summary.storage,
        'sha256': bagio.sha256_of_bag(path),
        'messages': summary.message_count,
        'start': summary.start,
        'duration': summary.duration,
        'topics': [
            {
                'topic': i.topic,
                'type': i.msgtype,
                'count': i.count,
                'rate_hz': i.rate,
                'max_gap_s': i.max_gap,
                'gaps_over': i.gaps_over(dataset.gap),
            }
            for i in summary.topics
        ],
        'gap_threshold_s': dataset.gap,
        'error': topic_error,
    }
    if topics is None:
        return report
    report['image_topic'] = {'topic': topics.image_topic, 'kind': topics.image_kind}
    report['image_formats'] = images
    report['cmd_topic'] = {'topic': topics.cmd_topic, 'kind': topics.cmd_kind}
    report['labels'] = _label_report(summary, topics, commands, dataset, table)
    if report['labels'].get('error'):
        report['error'] = report['labels']['error']
    if probe.tried and not probe.decoded:
        report['error'] = (
            f'bag {path}, topic {topics.image_topic}: none of {probe.tried} frames could be '
            f'decoded: {probe.reason}'
        )
    return report


class _DecodeProbe:
    """Decodes camera frames until one decodes: training needs at least one, and a bag whose
    every frame is broken must fail here, not after a long read in ``train``."""

    def __init__(self, bag: bagio.Bag) -> None:
        self.bag = bag
        self.decoded = False
        self.tried = 0
        self.reason = ''

    def offer(self, raw: Any, topic: str) -> None:
        if self.decoded:
            return
        from malpi_ros.runtime.image import decode  # cv2: only where a frame is decoded

        self.tried += 1
        try:
            decode(self.bag.deserialize(raw, topic))
        except (BagError, DecodeError) as err:
            self.reason = str(err)
        else:
            self.decoded = True


def _image_formats(
    bag: bagio.Bag, topics: bagio.Topics | None, samples: list[Any]
) -> list[dict[str, Any]]:
    """Sizes and encodings of the sampled frames, with how many of them had each."""
    if topics is None:
        return []
    from malpi_ros.runtime.image import decode  # cv2: only where a compressed frame needs it

    seen: Counter[tuple[str, str]] = Counter()
    for raw in samples:
        try:
            msg = bag.deserialize(raw, topics.image_topic)
            if topics.image_kind == 'raw':
                size, encoding = f'{msg.width}x{msg.height}', msg.encoding
            else:
                rgb = decode(msg)
                size, encoding = f'{rgb.shape[1]}x{rgb.shape[0]}', f'{msg.format} (compressed)'
        except (BagError, DecodeError) as err:
            size, encoding = 'undecodable', str(err)
        seen[(size, encoding)] += 1
    return [{'size': s, 'encoding': e, 'frames': n} for (s, e), n in seen.items()]


def _label_report(
    summary: bagio.BagSummary,
    topics: bagio.Topics,
    commands: list[tuple[float, float, float, int]],
    dataset: DatasetConfig,
    table: ActionTable,
) -> dict[str, Any]:
    frame_t = summary.topic(topics.image_topic).stamps
    cmd = np.asarray(commands, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(cmd[:, 1]) & np.isfinite(cmd[:, 2])
    out: dict[str, Any] = {'config': to_dict(dataset), 'actions': list(table.names)}
    if not finite.any():
        out['error'] = (
            f'bag {summary.path}, topic {topics.cmd_topic}: all {len(cmd)} commands are NaN/inf'
        )
        return out
    try:
        labels, stats = align_labels(frame_t, cmd[:, 0], cmd[:, 1], cmd[:, 2], dataset, table)
    except DatasetError as err:
        out['error'] = f'bag {summary.path}: {err}'
        return out
    used = labels[labels >= 0]
    counts = np.bincount(used, minlength=len(table))
    episodes = split_episodes(frame_t, dataset.gap, labels)
    lengths = [s.stop - s.start for s in episodes]
    out.update(
        histogram={name: int(c) for name, c in zip(table.names, counts, strict=True)},
        frames=stats.frames,
        commands=stats.commands,
        nan_commands=stats.nan_commands,
        stale=stats.stale,
        dropped=stats.dropped,
        episodes=len(episodes),
        windows=training_units(lengths, dataset),
        short_episodes=sum(1 for n in lengths if n < dataset.min_frames),
    )
    if topics.cmd_kind == 'applied':
        flags = takeover_flags(frame_t, cmd[:, 0], cmd[:, 1], cmd[:, 2], cmd[:, 3], dataset)
        out['takeovers'] = [
            {'episode': i, 'frames': s.stop - s.start, 'runs': runs}
            for i, s in enumerate(episodes)
            for runs in [
                [
                    {'frames': n, 'seconds': round(sec, 3)}
                    for n, sec in takeover_runs(frame_t[s], flags[s])
                ]
            ]
        ]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_text(report: dict[str, Any]) -> str:
    """The report of one bag as lines for a terminal."""
    lines = [
        f'{report["bag"]}  ({report["storage"]}, {report["messages"]} messages, '
        f'{report["duration"]:.1f} s, sha256 {report["sha256"][:12]})'
    ]
    width = max([len('topic')] + [len(t['topic']) for t in report['topics']])
    type_width = max([len('type')] + [len(t['type']) for t in report['topics']])
    gap = report['gap_threshold_s']
    lines.append(
        f'  {"topic":<{width}}  {"type":<{type_width}}  {"count":>7}  {"rate Hz":>8}  '
        f'{"max gap s":>9}  {f"gaps>{gap:g}s":>9}'
    )
    for t in report['topics']:
        lines.append(
            f'  {t["topic"]:<{width}}  {t["type"]:<{type_width}}  {t["count"]:>7}  '
            f'{_fmt(t["rate_hz"], ".2f"):>8}  {t["max_gap_s"]:>9.3f}  {t["gaps_over"]:>9}'
        )
    if 'image_topic' in report:
        formats = ', '.join(
            f'{f["size"]} {f["encoding"]} (x{f["frames"]})' for f in report['image_formats']
        )
        lines.append(
            f'  camera:   {report["image_topic"]["topic"]} ({report["image_topic"]["kind"]}): '
            f'{formats or "-"} in the first {SAMPLE_FRAMES} frames'
        )
        lines.append(f'  commands: {report["cmd_topic"]["topic"]} ({report["cmd_topic"]["kind"]})')
        labels = report['labels']
        if 'histogram' in labels:
            total = max(1, sum(labels['histogram'].values()))
            hist = ', '.join(
                f'{name} {n} ({n / total:.0%})' for name, n in labels['histogram'].items()
            )
            cfg = labels['config']
            lines.append(
                f'  labels (lag {cfg["lag"]:g} s, cmd_timeout {cfg["cmd_timeout"]:g} s, '
                f'stale={cfg["stale"]}): {hist}'
            )
            lines.append(
                f'  {labels["stale"]} stale frames, {labels["dropped"]} dropped, '
                f'{labels["nan_commands"]} NaN commands of {labels["commands"]}; '
                f'{labels["episodes"]} episodes, {labels["windows"]} '
                f'{from_dict(DatasetConfig, cfg).unit} ({labels["short_episodes"]} episodes '
                'too short)'
            )
        for ep in labels.get('takeovers', []):
            runs = ep['runs']
            took = sum(r['frames'] for r in runs)
            lasted = ', '.join(f'{r["seconds"]:.1f}' for r in runs)
            lines.append(
                f'  episode {ep["episode"]}: {len(runs)} takeovers, {took} of {ep["frames"]} '
                f'frames' + (f' (s: {lasted})' if runs else '')
            )
    return '\n'.join(lines)  # an error goes to stderr, once (see run)


def run(args: argparse.Namespace) -> int:
    where = str(args.config) if args.config is not None else 'settings'
    policy, dataset, _ = build_configs(read_config_file(args.config), {}, where)
    table = policy.actions
    reports = []
    for path in args.bags:
        try:
            report = inspect_bag(path, dataset, table, args.image_topic, args.cmd_topic)
        except BagError as err:
            report = {'bag': str(path), 'error': str(err)}
        reports.append(report)
        if not args.json and 'topics' in report:
            print(format_text(report))
    failed = [r for r in reports if r.get('error')]
    if args.json:
        json.dump({'bags': reports}, sys.stdout, indent=2, allow_nan=False, default=_json_value)
        print()
    for r in failed:
        print(f'malpi-ros inspect: error: {r["error"]}', file=sys.stderr)
    return 1 if failed else 0


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f'not JSON serializable: {type(value).__name__}')
