"""Placeholder for the motor_driver_node; the real node lands with its issue."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    print('motor_driver_node: not implemented yet', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
    main()
