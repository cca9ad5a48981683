"""Check that a kernel change leaves the CPU backend's results bit for bit as they were.

Runs every op on the op template's CPU cases (the InfoNCE in both sampling modes, every reduction and dtype,
with and without a confidence threshold; L_urp, L_cr and one head's losses in every layout; the negative
selection) through the public API and saves the outputs and gradients; ``compare`` reports every tensor whose
bytes differ between two such files. Each CPU variant computes its own bits, and random mode's pool gradient
depends on the thread count (it is summed per thread), so compare like with like:

    OMP_NUM_THREADS=1 RCPS_CPU_VARIANT=avx2 python scripts/cpu_bitwise.py dump before_avx2.pt   # the old build
    OMP_NUM_THREADS=1 RCPS_CPU_VARIANT=avx2 python scripts/cpu_bitwise.py dump after_avx2.pt    # rebuilt
    python scripts/cpu_bitwise.py compare before_avx2.pt after_avx2.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rcps_kernels as rk  # noqa: E402
from tests.kernels import op_template as template  # noqa: E402


def _infonce_cases() -> dict[str, dict]:
    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for sampling in ("topk", "random"):
            for reduction in ("mean", "sum", "none"):
                for threshold in (0.0, 0.6):
                    feats, logits, k = template.sized_infonce_case(template.CPU, sampling, dtype=dtype)
                    results[f"infonce/{dtype}/{sampling}/{reduction}/{threshold}"] = template.infonce_run(
                        "cpu", feats, logits, num_negatives=k, sampling=sampling, reduction=reduction,
                        confidence_threshold=threshold,
                    )  # fmt: skip
    return results


def _pseudo_supervision_cases() -> dict[str, dict]:
    results = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        inputs = [template.logits(template.PSEUDO_SUPERVISION_SHAPES["cpu"], seed=seed).to(dtype) for seed in range(3)]
        for reduction in ("none", "mean", "sum"):
            for layout in template.LAYOUTS:
                key = f"{dtype}/{reduction}/{layout}"
                results[f"urp_cr/{key}"] = template.rectified_and_cosine_run("cpu", inputs, reduction, layout)
                results[f"losses/{key}"] = template.pseudo_supervision_losses_run("cpu", inputs, reduction, layout)
    return results


def _selection_cases() -> dict[str, dict]:
    _, logits = template.infonce_case((5, 6, 4), classes=3)
    return {
        f"selection/{k}": dict(zip(("index", "count"), rk.select_confident_negatives(logits[1], k))) for k in (1, 5, 40)
    }


def dump(path: str) -> None:
    cases = {**_infonce_cases(), **_pseudo_supervision_cases(), **_selection_cases()}
    torch.save({key: {name: t.detach().cpu() for name, t in out.items()} for key, out in cases.items()}, path)
    print(f"{len(cases)} cases written to {path}")


def _same_bits(old: torch.Tensor, new: torch.Tensor) -> bool:
    if old.dtype != new.dtype or old.shape != new.shape:
        return False
    old, new = old.contiguous().reshape(-1), new.contiguous().reshape(-1)
    if old.is_floating_point():  # compare bytes: NaN payloads and signed zeros count
        old, new = old.view(torch.uint8), new.view(torch.uint8)
    return torch.equal(old, new)


def compare(before_path: str, after_path: str) -> int:
    before, after = torch.load(before_path), torch.load(after_path)
    if before.keys() != after.keys():
        print(f"the files hold different cases: {sorted(set(before) ^ set(after))}")
        return 1
    differing = [
        f"{key}: {name}" for key in before for name, old in before[key].items() if not _same_bits(old, after[key][name])
    ]
    for line in differing:
        print(line)
    print(f"{len(before)} cases, {sum(map(len, before.values()))} tensors, {len(differing)} differ")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dump").add_argument("out")
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("before")
    compare_parser.add_argument("after")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
