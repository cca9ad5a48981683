"""``python -m rcps_kernels.selfcheck [--backend cpu]``: is this install's compiled code correct here?

Runs forward + backward of every op on tiny inputs with the chosen backend and compares loss and
gradients with the plain PyTorch reference evaluated in float64. Takes well under a second
natively (after the kernels are loaded), so it also serves as a smoke test under CPU emulators.
"""

from __future__ import annotations

import argparse
import json

import torch

from .functional import (
    bidirectional_voxel_infonce,
    logit_cosine_consistency,
    pseudo_supervision_losses,
    rectified_pseudo_supervision,
)


def _infonce_inputs(generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    features = [torch.randn(1, 8, 4, 3, 2, generator=generator) for _ in range(3)]
    logits = [torch.randn(1, 3, 4, 3, 2, generator=generator) for _ in range(2)]
    return features, logits


def _logits(generator: torch.Generator, count: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 4, 3, 2, generator=generator) for _ in range(count)]


def _cases(generator: torch.Generator) -> dict:
    """name -> (function of (differentiable inputs..., backend=), the differentiable inputs)."""
    features, logits = _infonce_inputs(generator)
    urp_logits, cr_logits, head_logits = _logits(generator, 2), _logits(generator, 2), _logits(generator, 3)

    def infonce(sampling):
        def call(*leaves, backend):
            extra = {"generator": torch.Generator().manual_seed(7)} if sampling == "random" else {}
            return bidirectional_voxel_infonce(
                *leaves,
                *(t.to(leaves[0].dtype) for t in logits),
                num_negatives=5,
                sampling=sampling,
                backend=backend,
                **extra,
            )

        return call

    return {
        "bidirectional_voxel_infonce[topk]": (infonce("topk"), features),
        "bidirectional_voxel_infonce[random]": (infonce("random"), features),
        "rectified_pseudo_supervision": (
            lambda a, *, backend: rectified_pseudo_supervision(a, urp_logits[1].to(a.dtype), backend=backend),
            urp_logits[:1],
        ),
        "logit_cosine_consistency": (
            lambda a, b, *, backend: logit_cosine_consistency(a, b, backend=backend),
            cr_logits,
        ),
        "pseudo_supervision_losses": (
            lambda a, b, *, backend: pseudo_supervision_losses(a, b, head_logits[2].to(a.dtype), backend=backend),
            head_logits[:2],
        ),
    }


def _run(fn, inputs: list[torch.Tensor], backend: str, dtype: torch.dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outputs = fn(*leaves, backend=backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    # Distinct weights per output, so a swapped pair of outputs would show in the gradients.
    sum((i + 1) * out.sum() for i, out in enumerate(outputs)).backward()
    return [out.detach().double() for out in outputs] + [leaf.grad.double() for leaf in leaves]


def check_backend(backend: str = "cpu", seed: int = 0) -> list[str]:
    """Compare every op on `backend` (fp32) with the float64 reference.

    Returns:
        The names of the ops checked.

    Raises:
        AssertionError: an op's loss or gradient differs from the reference (the message names it).
    """
    checked = []
    for name, (fn, inputs) in _cases(torch.Generator().manual_seed(seed)).items():
        got = _run(fn, inputs, backend, torch.float32)
        expected = _run(fn, inputs, "reference", torch.float64)
        for index, (g, e) in enumerate(zip(got, expected)):
            what = f"output {index}" if index < len(got) - len(inputs) else f"gradient {index - len(got) + len(inputs)}"
            torch.testing.assert_close(
                g, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name, w=what: f"{n} on backend={backend}, {w}: {m}"
            )
        checked.append(name)
    return checked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="cpu", help="backend to check against the reference (default: cpu)")
    args = parser.parse_args(argv)
    from .extension import cpu_extension

    checked = check_backend(args.backend)
    print(json.dumps({"backend": args.backend, "cpu_variant": cpu_extension().variant, "ops_ok": checked}))


if __name__ == "__main__":
    main()
