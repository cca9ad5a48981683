"""``python -m rcps_kernels.info [--json]``: versions and, per backend, whether it is usable here."""

from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    import torch

    from ._backend import backend_status
    from ._extension import cpu_extension

    info = {
        "rcps_kernels": __import__("rcps_kernels").__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "num_threads": torch.get_num_threads(),
        "backends": backend_status(),
    }
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
        if key not in ("backends", "cpu_kernels"):
            print(f"{key:>13}: {value}")
    cpu = info["cpu_kernels"]
    print(
        f"{'cpu variant':>13}: {cpu['variant']} (built: {', '.join(cpu['built']) or 'none'}; "
        f"this CPU runs: {', '.join(cpu['supported']) or 'none of the portable ones'})"
    )
    for name, status in info["backends"].items():
        flags = f"built={status['built']} usable={status['usable']}"
        print(f"{name:>13}: {flags}" + (f"  ({status['reason']})" if "reason" in status else ""))


if __name__ == "__main__":
    main()
