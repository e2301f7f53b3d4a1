"""The edit-test loop's guard: a session refuses an installed copy older than the sources."""

from __future__ import annotations

from pathlib import Path

from support import REPO, stale_install

import malpi_ros


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_stale_install_names_changed_missing_and_leftover_files(tmp_path):
    source = _tree(
        tmp_path / 'src',
        {'a.py': 'x = 1\n', 'runtime/b.py': 'y = 2\n', 'runtime/new.py': 'z = 3\n'},
    )
    installed = _tree(
        tmp_path / 'inst',
        {
            'a.py': 'x = 1\n',
            'runtime/b.py': 'y = 1\n',  # an edit not yet installed
            'b_old.py': 'y = 2\n',  # moved away in the sources, still importable here
            'msg/_thing.py': '',  # generated messages exist only in the install
        },
    )
    assert stale_install(source, installed) == [
        'runtime/b.py (changed)',
        'runtime/new.py (not installed)',
        'b_old.py (installed, not in the sources)',
    ]
    assert stale_install(source, source) == []


def test_the_installed_package_is_the_source_tree():
    """What conftest checks before any test runs, as a test of its own."""
    installed = Path(malpi_ros.__file__).parent
    assert installed != REPO / 'malpi_ros'  # the tests import the install, not the sources
    assert stale_install(REPO / 'malpi_ros', installed) == []
