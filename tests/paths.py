"""Where the repository is, for tests that read its files or run commands in it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
