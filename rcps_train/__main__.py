"""``python -m rcps_train ...`` is the same as the ``rcps-train`` console script."""

from __future__ import annotations

import sys

#: Top-level modules of the ``train`` extra's packages (pyproject.toml); medpy brings SimpleITK.
TRAIN_EXTRA_MODULES = {"nibabel", "h5py", "medpy", "SimpleITK", "scipy", "tqdm", "matplotlib"}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; without the ``train`` extra installed, say how to install it instead of a traceback."""
    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"rcps-train: the trainer needs the optional dependencies of the 'train' extra "
            f'(module {err.name!r} is missing): pip install "rcps-kernels[train]"',
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
