"""Entry points of the installed package that do not need a build: the trainer's CLI without its extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

WITHOUT_SCIPY = textwrap.dedent("""
    import importlib.abc, sys

    class NoScipy(importlib.abc.MetaPathFinder):  # as if the 'train' extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "scipy":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoScipy())
    from rcps_train.__main__ import main
    raise SystemExit(main(["--help"]))
""")


def test_the_trainer_names_its_extra_when_it_is_missing():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_SCIPY],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "module 'scipy' is missing" in proc.stderr and 'pip install "rcps-kernels[train]"' in proc.stderr


def test_the_trainer_help_works_with_its_extra():
    proc = subprocess.run(
        [sys.executable, "-m", "rcps_train", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "make-synthetic" in proc.stdout
