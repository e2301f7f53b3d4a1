"""malpi-ros train my_drive_bag/ [more_bags ...] --out bundles/malpi_v1 [--config train.yaml]

Train the conv+LSTM policy on recordings of a person driving (camera + cmd_vel) and write a
model bundle the robot loads. Inside the bundle, beside the model files: history.csv,
learning_curves.png, confusion.png (validation) and summary.txt. Nothing is written at --out
unless training succeeds; an existing bundle there is replaced only then. TensorBoard logs go
beside it (--logdir, default BUNDLE.logs/<run time>/), written as training goes.

Topics are found by type (Image/CompressedImage, Twist/TwistStamped) unless named. Decoded,
resized uint8 frames are cached in --cache-dir (default: BUNDLE.cache beside the bundle) so a
second run skips decoding and a recording larger than RAM trains.

Every finished epoch is backed up in --backup-dir (default BUNDLE.backup): a killed run started
again with the same command resumes from its last finished epoch; the backup is removed once
the bundle is written. --distribute mirrored trains on every GPU of this machine,
--distribute multi-worker on the machines that TF_CONFIG names (one process each, the same
command; README "Training on several machines"); the batch is the global batch either way.

--config FILE.yaml holds the sections model, preprocess, actions, dataset and train (the
fields of malpi_ros.config; see config/train_example.yaml); flags given on the command line
override it. Sizes given in only one of model/preprocess apply to both.

Defaults are those of malpi_ros.config. The memory recipe (DESIGN §4; the values of
config/train_example.yaml, what the memory test trains with): per-frame standardized input;
the LSTM state carried across consecutive chunks of 32 frames of each episode (truncated
BPTT: training reaches the states the robot reaches after minutes of driving), in 8 lanes (the
batch), episodes cut into pieces that start from a zero state, no loss on the first 10 steps
after a zero state; Adam lr 3e-4 with clipnorm 1; up to 30 epochs,
early stopping on val_loss with patience 10 that cannot act before epoch 10 (--min-epochs:
learning to remember starts with a plateau); 20% of the episodes held out for validation;
class weights from the training labels, capped at 10x.

--warm-start BUNDLE starts from that bundle's weights instead of random ones (the model must be
the same; the optimizer starts afresh): retraining after a round of takeovers on everything so
far needs fewer epochs from the last round's policy (README "DAgger rounds").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from malpi_ros.config_file import build_configs, read_config_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', metavar='BAG', help='rosbag2 directory or .mcap file')
    parser.add_argument('--out', required=True, type=Path, metavar='BUNDLE', help='bundle dir')
    parser.add_argument('--config', type=Path, metavar='FILE.yaml', help='settings file')
    parser.add_argument('--image-topic', help='camera topic (default: the one image topic)')
    parser.add_argument('--cmd-topic', help='command topic (default: the one Twist topic)')
    parser.add_argument('--cache-dir', type=Path, help='frame cache (default: BUNDLE.cache)')
    parser.add_argument(
        '--logdir',
        type=Path,
        help='TensorBoard logs, one folder per run (default: BUNDLE.logs beside the bundle, '
        'written while training: tensorboard --logdir BUNDLE.logs)',
    )
    parser.add_argument('--no-logdir', action='store_true', help='write no TensorBoard logs')
    parser.add_argument('--no-cache', action='store_true', help='keep frames in memory only')
    parser.add_argument(
        '--backup-dir',
        type=Path,
        help='back up every finished epoch here; a killed run started again with the same '
        'command resumes from it (default: BUNDLE.backup beside the bundle, removed once the '
        'bundle is written)',
    )
    parser.add_argument('--no-backup', action='store_true', help='no backup, no resuming')
    parser.add_argument(
        '--warm-start',
        type=Path,
        metavar='BUNDLE',
        help="start from this bundle's weights (the same model; e.g. the last DAgger round's)",
    )
    group = parser.add_argument_group('overrides of the config file')
    group.add_argument('--epochs', type=int)
    group.add_argument('--batch-size', type=int)
    group.add_argument('--lr', type=float, dest='learning_rate', help='Adam learning rate')
    group.add_argument('--val-fraction', type=float, help='share of frames held out, by episode')
    group.add_argument('--seed', type=int)
    group.add_argument('--patience', type=int, help='early stopping patience (epochs)')
    group.add_argument('--min-epochs', type=int, help='no early stop before this epoch')
    group.add_argument(
        '--target-val-accuracy',
        type=float,
        help='stop after the first epoch whose validation accuracy reaches this',
    )
    group.add_argument(
        '--no-class-weights',
        action='store_false',
        dest='class_weighting',
        default=None,
        help='do not weight rare actions up',
    )
    group.add_argument(
        '--state',
        choices=('carried', 'zero'),
        help='carried: the LSTM state flows across chunks of an episode (default); zero: '
        'windows each from a zero state',
    )
    group.add_argument('--seq-len', type=int, help='frames per chunk (scored steps per window)')
    group.add_argument('--burn-in', type=int, help='unscored steps after a zero state')
    group.add_argument('--stride', type=int, help='frames between window starts (state zero)')
    group.add_argument(
        '--bptt',
        type=int,
        metavar='N',
        help='state zero: backpropagate through the last N frames of each window only (the '
        'frames before run forward only); 0: the whole window',
    )
    group.add_argument(
        '--window',
        type=int,
        metavar='K',
        help="train a window policy instead (the peers' way): every step re-runs the last K "
        'frames from a zero state; trained on windows of K frames scored on the last',
    )
    group.add_argument(
        '--distribute',
        choices=('none', 'mirrored', 'multi-worker'),
        help='none: one process (default); mirrored: every GPU of this machine; multi-worker: '
        'the machines TF_CONFIG names (README "Training on several machines")',
    )
    group.add_argument(
        '--xla',
        action='store_true',
        default=None,
        help='XLA-compile the training step (on a GPU; ignored on a CPU)',
    )
    group.add_argument('--height', type=int, help='model input height')
    group.add_argument('--width', type=int, help='model input width')
    parser.add_argument(
        '--verbose', type=int, choices=(0, 1, 2), help='Keras output (default: 1 on a terminal)'
    )


def run(args: argparse.Namespace) -> int:
    from malpi_ros.learn.train import tensorboard_logs, train  # TensorFlow: only here

    where = str(args.config) if args.config is not None else 'settings'
    policy, dataset, train_cfg = build_configs(read_config_file(args.config), vars(args), where)
    if args.no_cache:
        cache_dir = None
    elif args.cache_dir is not None:
        cache_dir = args.cache_dir
    else:
        cache_dir = args.out.with_name(args.out.name + '.cache')
    logdir = None if args.no_logdir else args.logdir or args.out.with_name(args.out.name + '.logs')
    backup_dir = (
        None
        if args.no_backup
        else args.backup_dir or args.out.with_name(args.out.name + '.backup')
    )
    result = train(
        args.bags,
        args.out,
        policy,
        dataset,
        train_cfg,
        image_topic=args.image_topic,
        cmd_topic=args.cmd_topic,
        cache_dir=cache_dir,
        backup_dir=backup_dir,
        verbose=args.verbose,
        callbacks=[tensorboard_logs(logdir)] if logdir is not None else [],
        warm_start=args.warm_start,
    )
    if result.bundle is not None:  # None: a worker that is not the chief
        print(f'bundle written: {result.bundle}')
    return 0
