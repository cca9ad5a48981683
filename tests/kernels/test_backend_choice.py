"""Which backend ``backend="auto"`` picks per device, with the device's properties substituted:
the compute capability and Triton release (Triton >= 3.3 serves 8.0+), the arches the CUDA
extension carries (SASS per major version, PTX upward), ROCm (``torch.version.hip``), MPS, XPU and
meta tensors, the fallback to "torch" with its one warning, and what ``rcps_kernels.info`` reports.
"""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

import rcps_kernels as rk
from rcps_kernels import backends, extension, info, settings

CUDA0 = torch.device("cuda", 0)
DEFAULT_ARCHS = settings.DEFAULT_CUDA_ARCHS.split(";")


@pytest.fixture
def gpu(monkeypatch):
    """A pretend NVIDIA GPU: returns a function setting its capability, the Triton release
    (None: not installed), the arches the CUDA extension was built for and ROCm."""
    backends.warn_fallback_once.cache_clear()
    monkeypatch.delenv("RCPS_GPU_BACKEND", raising=False)

    def configure(capability=(8, 0), triton=(3, 6), archs=tuple(DEFAULT_ARCHS), hip=None):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(backends, "triton_version", lambda: triton)
        monkeypatch.setattr(extension, "load_cuda_extension", lambda: None)
        monkeypatch.setattr(extension, "build_info", lambda: types.SimpleNamespace(CUDA_ARCHS=list(archs)))

    yield configure
    backends.warn_fallback_once.cache_clear()


def auto(device=CUDA0) -> str:
    return backends.resolve("auto", device)


@pytest.mark.parametrize(
    "capability,triton,archs,expected",
    [
        ((8, 0), (3, 6), DEFAULT_ARCHS, "triton"),  # A100
        ((9, 0), (3, 6), DEFAULT_ARCHS, "triton"),  # H100
        ((12, 0), (3, 6), DEFAULT_ARCHS, "triton"),  # RTX 5090, a current Triton
        ((7, 5), (3, 6), DEFAULT_ARCHS, "cuda"),  # T4 / RTX 2080 Ti: Triton 3.3+ dropped Turing
        ((7, 5), (3, 2), DEFAULT_ARCHS, "triton"),  # ... which Triton 3.2 still served
        ((12, 0), (3, 2), DEFAULT_ARCHS, "cuda"),  # Blackwell is beyond Triton 3.2
        ((8, 6), None, DEFAULT_ARCHS, "cuda"),  # no Triton installed
        ((8, 6), None, ["8.0"], "cuda"),  # sm_80 SASS runs on 8.6 (same major, higher minor)
        ((8, 0), None, ["8.6"], "torch"),  # but sm_86 SASS not on 8.0, nor PTX 8.6
        ((13, 0), None, DEFAULT_ARCHS, "cuda"),  # a future GPU: the driver compiles the PTX (12.0)
        ((7, 0), (3, 6), DEFAULT_ARCHS, "torch"),  # V100: nvcc 13 builds no sm_70; Triton 3.6 skips it
        ((7, 0), (3, 2), DEFAULT_ARCHS, "triton"),
        ((7, 5), (3, 6), ["8.0", "9.0"], "torch"),  # an extension built before Turing was added
        ((9, 0), None, ["9.0a"], "cuda"),  # an arch-specific build serves its own GPU ...
        ((10, 0), None, ["9.0a"], "torch"),  # ... and no other
    ],
)
def test_nvidia_choice(gpu, capability, triton, archs, expected):
    gpu(capability=capability, triton=triton, archs=archs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning: tested below
        assert auto() == expected


def test_fallback_on_a_gpu_warns_once_naming_each_reason(gpu):
    gpu(capability=(7, 5), triton=(3, 6), archs=["8.0", "9.0"])
    with pytest.warns(RuntimeWarning, match=r"Triton 3\.6 compiles for compute capability >= 8\.0.*this GPU is 7\.5"):
        assert auto() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto() == "torch"


def test_explicit_backends_that_cannot_serve_the_gpu_raise(gpu):
    gpu(capability=(7, 5), triton=(3, 6), archs=["8.0", "9.0"])
    with pytest.raises(RuntimeError, match=r"SASS for 8\.0, 9\.0 and PTX for 9\.0; this GPU is 7\.5"):
        backends.resolve("cuda", CUDA0)
    with pytest.raises(RuntimeError, match=r"Triton 3\.6 compiles for compute capability >= 8\.0"):
        backends.resolve("triton", CUDA0)
    assert backends.resolve("torch", CUDA0) == "torch"


def test_the_environment_names_the_gpu_backend_and_torch_still_catches(gpu, monkeypatch):
    gpu(capability=(8, 0), triton=(3, 6))
    monkeypatch.setenv("RCPS_GPU_BACKEND", "cuda")
    assert auto() == "cuda"
    gpu(capability=(7, 5), triton=(3, 6))
    monkeypatch.setenv("RCPS_GPU_BACKEND", "triton")
    with pytest.warns(RuntimeWarning, match="triton: Triton 3.6"):
        assert auto() == "torch"


def test_rocm_takes_triton_with_a_rocm_precision_or_torch(gpu, monkeypatch):
    monkeypatch.delenv("RCPS_TRITON_DOT_PRECISION", raising=False)
    gpu(capability=(9, 4), triton=(3, 3), hip="6.4")  # MI300: Triton on ROCm has no sm floor
    assert auto() == "triton"
    _, not_used = backends.auto_choice(CUDA0)
    assert "not built for ROCm" in not_used["cuda"]
    assert settings.triton_dot_precision(rocm=True) == "ieee"
    assert settings.triton_dot_precision(rocm=False) == "tf32x3"
    monkeypatch.setenv("RCPS_TRITON_DOT_PRECISION", "tf32x3")
    with pytest.raises(ValueError, match="RCPS_TRITON_DOT_PRECISION=tf32x3 is NVIDIA-only"):
        settings.triton_dot_precision(rocm=True)
    gpu(capability=(9, 4), triton=None, hip="6.4")
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert auto() == "torch"
    with pytest.raises(RuntimeError, match="not built for ROCm"):
        backends.resolve("cuda", CUDA0)


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:1", "meta"])
def test_other_devices_take_torch_quietly(device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto(torch.device(device)) == "torch"
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        backends.resolve("cpu", torch.device(device))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        backends.resolve("cuda", torch.device(device))


def test_triton_takes_cpu_tensors_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got tensors on cpu"):
        backends.resolve("triton", "cpu")


def test_cpu_takes_the_cpu_kernels_and_falls_back_to_torch_with_one_warning(monkeypatch):
    if extension.load_cpu_extension() is not None:
        pytest.skip("the CPU extension is not usable")
    assert auto(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(extension, "load_cpu_extension", lambda: "pretend the build failed")
    backends.warn_fallback_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="pretend the build failed.*backend='torch'"):
        assert auto(torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto(torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="not usable here"):
        backends.resolve("cpu", torch.device("cpu"))
    backends.warn_fallback_once.cache_clear()


def test_reference_only_by_name():
    for device in ("cpu", "meta"):
        chosen, not_used = backends.auto_choice(torch.device(device))
        assert chosen != "reference" and "chosen only by name" in not_used["reference"]
        assert backends.resolve("reference", torch.device(device)) == "reference"


def test_info_reports_every_backend_per_device(gpu, monkeypatch, capsys):
    gpu(capability=(7, 5), triton=(3, 6), archs=["8.0", "9.0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        info.main(["--json"])
    devices = {d["device"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    assert set(devices) >= {"cpu", "cuda:0", "mps"}
    t4 = devices["cuda:0"]
    assert (t4["name"], t4["capability"], t4["auto"]) == ("Tesla T4", "7.5", "torch")
    assert "Triton 3.6" in t4["not_used"]["triton"] and "this GPU is 7.5" in t4["not_used"]["cuda"]
    assert devices["mps"]["auto"] == "torch"
    for device in devices.values():  # every backend is either chosen or explained
        assert set(device["not_used"]) | {device["auto"]} == set(backends.NAMES) - {"auto"}


@pytest.mark.parametrize(
    "archs,capability,covered",
    [
        (["7.5", "8.0"], (7, 5), True),
        (["7.5", "8.0"], (8, 9), True),  # sm_80 SASS
        (["7.5"], (8, 0), True),  # PTX 7.5, JIT-compiled by the driver
        (["8.0", "9.0"], (7, 5), False),
        (["8.6", "9.0"], (8, 0), False),
        (["10.0", "12.0"], (11, 0), False),  # sm_100 SASS runs on 10.x only, the PTX is 12.0's ...
        (["10.0"], (11, 0), True),  # ... while the PTX of 10.0 serves 11.0
        (["12.0"], (10, 0), False),
    ],
)
def test_cuda_arch_coverage(archs, capability, covered):
    assert backends.cuda_archs_cover(archs, capability) is covered


# --- the registry ---------------------------------------------------------------------------


def test_every_name_has_one_record_and_the_choices_come_from_the_records():
    assert backends.NAMES == ("auto", *(record.name for record in backends.REGISTRY))
    assert set(backends.BY_NAME) == set(backends.NAMES) - {"auto"}
    assert backends.GPU_BACKENDS == ("triton", "cuda")
    assert backends.backend_status().keys() == backends.BY_NAME.keys()
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("tpu", "cpu")
    with pytest.raises(ValueError, match="backend 'reference' has no kernel table"):
        backends.kernel_table("reference")


def test_a_backend_added_to_the_registry_alone_is_resolved_chosen_and_run(monkeypatch):
    # A plain-PyTorch backend placed first for CPU tensors: its record and its (here borrowed)
    # kernel table are all it needs to be accepted, picked by auto, reported and run.
    plain = backends.Backend(
        "plain_cpu", ("cpu",), ("cpu",), lambda device: None, lambda: None, backends.BY_NAME["torch"].kernels
    )
    registry = (plain, *backends.REGISTRY)
    monkeypatch.setattr(backends, "REGISTRY", registry)
    monkeypatch.setattr(backends, "BY_NAME", {record.name: record for record in registry})
    monkeypatch.setattr(backends, "NAMES", ("auto", *(record.name for record in registry)))
    assert backends.resolve("auto", "cpu") == "plain_cpu"
    assert backends.auto_choice(torch.device("cpu"))[1]["cpu"] == "plain_cpu comes first on cpu"
    assert backends.backend_status()["plain_cpu"] == {"built": True}
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    logits = [torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    for function, inputs in (
        (rk.bidirectional_voxel_infonce, (*feats, *logits)),
        (rk.rectified_pseudo_supervision, logits),
        (rk.logit_cosine_consistency, logits),
    ):
        torch.testing.assert_close(function(*inputs, backend="plain_cpu"), function(*inputs, backend="reference"))
    with pytest.raises(ValueError, match="backend='plain_cpu' needs CPU tensors"):
        backends.resolve("plain_cpu", "meta")
