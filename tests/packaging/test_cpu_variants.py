"""CPU instruction-set variants: which one is chosen, refusals, and each built variant this CPU
runs against the reference (in a subprocess each: a process loads exactly one variant)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rcps_kernels import build_config, extension
from tests.paths import REPO_ROOT

PORTABLE = tuple(build_config.X86_VARIANTS)
ALL_FLAGS = set().union(*build_config.X86_LEVEL_FLAGS.values())


def test_the_widest_variant_the_cpu_runs_is_chosen(monkeypatch):
    monkeypatch.delenv("RCPS_CPU_VARIANT", raising=False)
    assert extension.choose_cpu_variant(PORTABLE, PORTABLE) == ("avx512", None)
    assert extension.choose_cpu_variant(PORTABLE, ("baseline", "avx2")) == ("avx2", None)
    assert extension.choose_cpu_variant(PORTABLE, ("baseline",)) == ("baseline", None)
    assert extension.choose_cpu_variant(("baseline", "avx2"), PORTABLE) == ("avx2", None)
    assert extension.choose_cpu_variant(("native",) + PORTABLE, ("baseline",)) == ("native", None)
    variant, reason = extension.choose_cpu_variant(("avx2", "avx512"), ("baseline",))
    assert variant is None and "none of the built variants" in reason


def test_a_requested_variant_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(extension, "cpuinfo_flags", lambda: ALL_FLAGS - {"avx512bw"})
    monkeypatch.setenv("RCPS_CPU_VARIANT", "avx512")
    with pytest.raises(ValueError, match="RCPS_CPU_VARIANT=avx512 needs x86-64-v4.*missing flags: avx512bw"):
        extension.choose_cpu_variant(PORTABLE, ("baseline", "avx2"))
    monkeypatch.setenv("RCPS_CPU_VARIANT", "avx2")
    assert extension.choose_cpu_variant(PORTABLE, ("baseline", "avx2")) == ("avx2", None)
    monkeypatch.setenv("RCPS_CPU_VARIANT", "sse2")
    with pytest.raises(ValueError, match=r"RCPS_CPU_VARIANT=sse2, but the built CPU variants are \['baseline'"):
        extension.choose_cpu_variant(PORTABLE, PORTABLE)


@pytest.mark.skipif(not build_config.is_x86_64(), reason="the portable variants are x86-64 levels")
def test_supported_levels_need_both_cpuinfo_flags_and_torch_cpuid(monkeypatch):
    monkeypatch.setattr(extension, "cpuinfo_flags", lambda: set(ALL_FLAGS))
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    assert extension.supported_x86_variants() == PORTABLE
    # qemu-user shows the host's /proc/cpuinfo; CPUID (what torch asks) is the emulated CPU's.
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    assert extension.supported_x86_variants() == ("baseline", "avx2")
    monkeypatch.setattr(extension, "cpuinfo_flags", lambda: ALL_FLAGS - {"movbe"})
    assert extension.supported_x86_variants() == ("baseline",)
    monkeypatch.setattr(extension, "cpuinfo_flags", lambda: ALL_FLAGS - {"sse4_2"})
    assert extension.supported_x86_variants() == ()


def test_pure_ptx_of_the_highest_cuda_arch_is_embedded():
    flags = build_config.cuda_gencode_flags(["9.0", "8.0"])
    assert flags[-2:] == ["-gencode", "arch=compute_90,code=compute_90"]
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags


def _built_and_runnable() -> list[str]:
    info = extension.build_info()
    if info is None:
        return []
    supported = extension.supported_x86_variants()
    return [v for v in info.CPU_VARIANTS if v not in PORTABLE or v in supported]


@pytest.mark.parametrize(
    "variant",
    _built_and_runnable()
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason="no compiled CPU kernels in this checkout (build them: pip install --no-build-isolation -e .)"
            ),
        )
    ],
)
def test_each_runnable_variant_matches_the_reference(variant):
    env = {**os.environ, "RCPS_CPU_VARIANT": variant, "RCPS_NO_JIT": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from rcps_kernels import extension, selfcheck\n"
            "ops = selfcheck.check_backend('cpu')\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(extension.COMPILED_PREFIX))\n"
            "print(json.dumps({'variant': extension.cpu_extension().variant, 'loaded': loaded, 'ops': ops}))",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["variant"] == variant and result["loaded"] == [extension.COMPILED_PREFIX + variant]
    assert len(result["ops"]) == 5


def test_selfcheck_names_an_op_whose_kernel_is_off(monkeypatch):
    from rcps_kernels import selfcheck

    exact = selfcheck.logit_cosine_consistency

    def off_by_a_percent(a, b, *, backend):
        loss = exact(a, b, backend=backend)
        return loss * 1.01 if backend == "cpu" else loss

    monkeypatch.setattr(selfcheck, "logit_cosine_consistency", off_by_a_percent)
    with pytest.raises(AssertionError, match="logit_cosine_consistency on backend=cpu, output 0"):
        selfcheck.check_backend("cpu")
