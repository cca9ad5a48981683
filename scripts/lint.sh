#!/usr/bin/env bash
# The style checks CI runs (and .pre-commit-config.yaml runs per commit): ruff lint and format for
# Python, clang-format for csrc/. Fix with: .venv/bin/ruff check --fix . && .venv/bin/ruff format . &&
# .venv/bin/clang-format -i $(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/clang-format --dry-run --Werror $(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
