"""The JIT fallback: without an importable built extension, the CPU kernels are compiled with ninja
on first use and give the same results as the reference.

Runs in a subprocess (the built extension registers the same ops, and a process can register
them once) that hides ``rcps_kernels._C`` from imports and builds into a temporary directory.
It compiles the C++ sources, so it takes a minute or two.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class HideBuiltExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rcps_kernels._C":
                raise ImportError("hidden by the JIT test")
            return None

    sys.meta_path.insert(0, HideBuiltExtension())
    import torch
    import rcps_kernels as rk
    from rcps_kernels._extension import load_cpu_extension

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = load_cpu_extension()
    assert reason is None, reason
    assert any("building the CPU kernels with ninja" in str(w.message) for w in caught)
    assert "rcps_kernels._C" not in sys.modules

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


def test_cpu_kernels_build_with_ninja_when_the_extension_is_missing(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "RCPS_NO_JIT": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "jit ok" in proc.stdout
