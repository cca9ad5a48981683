"""``python -m rcps_kernels.info [--json]``: versions and, per backend, whether it is usable here."""
from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    import torch

    from ._backend import backend_status

    info = {
        "rcps_kernels": __import__("rcps_kernels").__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "num_threads": torch.get_num_threads(),
        "backends": backend_status(),
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
        if key != "backends":
            print(f"{key:>13}: {value}")
    for name, status in info["backends"].items():
        flags = f"built={status['built']} usable={status['usable']}"
        print(f"{name:>13}: {flags}" + (f"  ({status['reason']})" if "reason" in status else ""))


if __name__ == "__main__":
    main()
