"""``python -m rcps_kernels.info [--json]``: versions, what is built, and per visible device which
backend ``backend="auto"`` picks and why it does not use the others."""

from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    import torch

    from .backends import backend_status, device_report, visible_devices
    from .extension import build_info, cpu_extension

    info = {
        "rcps_kernels": __import__("rcps_kernels").__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rocm": torch.version.hip,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "num_threads": torch.get_num_threads(),
        "backends": backend_status(),
        "devices": [device_report(device) for device in visible_devices()],
    }
    info["cuda_extension_archs"] = getattr(build_info(), "CUDA_ARCHS", None)
    cpu = cpu_extension()
    # variant: the one this process loaded ("jit" for a build from source at import, None if none);
    # built: the variants installed; supported: the portable variants this CPU runs.
    info["cpu_kernels"] = {
        "variant": cpu.variant,
        "built": list(cpu.built),
        "supported": list(cpu.supported),
        "built_for_torch": cpu.built_for_torch,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if key not in ("backends", "cpu_kernels", "devices"):
            print(f"{key:>20}: {value}")
    cpu = info["cpu_kernels"]
    print(
        f"{'cpu variant':>20}: {cpu['variant']} (built: {', '.join(cpu['built']) or 'none'}; "
        f"this CPU runs: {', '.join(cpu['supported']) or 'none of the portable ones'})"
    )
    for name, status in info["backends"].items():
        reason = f"  ({status['reason']})" if "reason" in status else ""
        print(f"{'backend ' + name:>20}: built={status['built']}{reason}")
    for device in info["devices"]:
        about = ", ".join(f"{key} {device[key]}" for key in ("name", "capability") if key in device)
        print(f"{'auto on ' + device['device']:>20}: {device['auto']}" + (f"  ({about})" if about else ""))
        for name, reason in device["not_used"].items():
            print(f"{'':>22}not {name}: {reason}")


if __name__ == "__main__":
    main()
