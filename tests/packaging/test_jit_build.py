"""The JIT fallback: without usable compiled kernels (none installed, or built against another
torch release), the CPU kernels are compiled with ninja on first use, after one warning, and give
the same results as the reference.

Each case runs in a subprocess (a built extension registers the same ops, and a process can
register them once) that hides the build record (``extension.BUILD_INFO_MODULE``) or replaces it with
one naming another torch, and builds into a temporary directory shared by the cases (the second
reuses the first's build). The first compiles the C++ sources, so it takes a minute or two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.paths import REPO_ROOT

CHILD = textwrap.dedent("""
    import importlib.abc, sys, types, warnings

    from rcps_kernels import extension  # imports no compiled module: the finder below is still in time

    SCENARIO = sys.argv[1]

    class HideCompiledKernels(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == extension.BUILD_INFO_MODULE or name.startswith(extension.COMPILED_PREFIX):
                raise ImportError("hidden by the JIT test")
            return None

    sys.meta_path.insert(0, HideCompiledKernels())
    if SCENARIO == "other-torch":
        record = types.ModuleType(extension.BUILD_INFO_MODULE)
        record.TORCH_VERSION, record.CUDA_EXTENSION = "2.0.0+cpu", None
        record.CPU_VARIANTS = {"baseline": "x86-64-v2"}
        sys.modules[extension.BUILD_INFO_MODULE] = record
    import torch
    import rcps_kernels as rk
    cpu_extension, load_cpu_extension = extension.cpu_extension, extension.load_cpu_extension

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = load_cpu_extension()
        assert load_cpu_extension() == reason  # remembered: no second build, no second warning
    assert reason is None, reason
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "building the CPU kernels with ninja" in messages[0], messages
    if SCENARIO == "other-torch":
        assert "built for torch 2.0.0+cpu" in messages[0], messages
    assert cpu_extension().variant == "jit"
    assert not [m for m in sys.modules if m.startswith(extension.COMPILED_PREFIX)]

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 4, 3, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    logits = [torch.randn(1, 2, 4, 3, 2, generator=g) for _ in range(2)]
    fused = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=5, backend="cpu")
    exact = rk.bidirectional_voxel_infonce(*feats, *logits, num_negatives=5, backend="reference")
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=1e-6)
    urp = rk.rectified_pseudo_supervision(logits[0], logits[0].flip(1), backend="cpu")
    torch.testing.assert_close(
        urp, rk.rectified_pseudo_supervision(logits[0], logits[0].flip(1), backend="reference"),
        rtol=1e-5, atol=1e-6)
    print("jit ok")
""")


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.mark.parametrize("scenario", ["nothing-compiled", "other-torch"])
def test_cpu_kernels_build_with_ninja_when_the_compiled_ones_are_unusable(scenario, extensions_dir):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), "RCPS_NO_JIT": "0"}
    env.pop("RCPS_CPU_VARIANT", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, scenario],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "jit ok" in proc.stdout
