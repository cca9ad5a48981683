"""Host time of each piece of one fused voxel InfoNCE call on a CUDA device, at the LA shape.

    python scripts/host_time_gpu.py [--k 400] [--calls 200] [--shape la]

(``TRITON_INTERPRET=1 ... --device cpu --shape small --calls 2`` runs it anywhere, as a check
of the script alone: its times then mean nothing.)

At the LA shape the call is bound by the host: the GPU waits for launches. The profiler
inflates host time, so this script times each piece on its own in a loop of --calls calls:
"host" is the time to issue them (no sync inside the loop), "wall" adds the final sync, so wall
above host means the device was the slower side. Pieces that sync (the finite check) show the
wait in both. "public call + backward" minus "finite-input check" is the call without its one
host sync. Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl

import rcps_kernels as rk
from benchmarks.bench_infonce_gpu import make_inputs
from rcps_kernels import validation
from rcps_kernels.ops import infonce_triton
from rcps_kernels.ops.infonce import mean_loss_with_grads
from rcps_kernels.ops.infonce_triton_common import normalise_rows
from rcps_kernels.ops.kernels import InfoNCEParams
from rcps_kernels.ops.selection import anchor_class_order, negative_tables


@triton.jit
def _empty_kernel(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 0.0)


def time_calls(fn, calls: int, sync) -> tuple[float, float]:
    """(host us, wall us) per call of fn() over `calls` calls after a warm-up."""
    for _ in range(min(calls, 10)):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    sync()
    done = time.perf_counter()
    return 1e6 * (issued - start) / calls, 1e6 * (done - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shape", default="la")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    k, dev = args.k, args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    a, p, n, al, nl = make_inputs(args.shape, args.shape, torch.float32, dev)
    z1, z2, zn = (t.reshape(t.shape[0], t.shape[1], -1) for t in (a, p, n))
    labels, idx, cnt, logits_total = negative_tables(al, nl, k, False, 0.0)
    N = labels.numel()
    order, _ = infonce_triton.class_order(labels, 2)
    leaves = [t.detach().clone().requires_grad_() for t in (a, p, n)]
    params = InfoNCEParams(labels, idx, cnt, temperature=0.1, num_negatives=k, random=False)
    grads = [torch.randn_like(t) for t in (a, p, n)]
    scale = torch.ones((), device=dev)
    scratch = torch.empty(1, device=dev)
    # The pool's negative-selection keys per class, for the sort in selection and an
    # alternative: one top-K over unique int64 keys (confidence bits, then the index reversed).
    pool_labels = torch.softmax(nl, 1).argmax(1).reshape(-1)
    confidence = torch.softmax(nl, 1).amax(1).reshape(-1)
    other_class = pool_labels.unsqueeze(0) != torch.arange(2, device=dev).unsqueeze(1)
    sort_key = torch.where(other_class, confidence, -1.0)
    voxel = torch.arange(confidence.numel(), device=dev)
    unique_key = torch.where(other_class, (confidence.view(torch.int32).long() << 32) | (0xFFFFFFFF - voxel), -1)

    def public(*inputs):
        return rk.bidirectional_voxel_infonce(*inputs, al, nl, num_negatives=k, temperature=0.1, backend="triton")

    def step():
        x = [t.detach().clone().requires_grad_() for t in (a, p, n)]
        public(*x).backward()

    def no_grad_call():
        with torch.no_grad():
            public(a, p, n)

    def mean_function():
        mean_loss_with_grads(*[t.reshape(t.shape[0], t.shape[1], -1) for t in leaves], params, "triton")

    pieces = {
        "empty Triton launch": lambda: _empty_kernel[(1,)](scratch),
        "one aten op (add_)": lambda: scratch.add_(1.0),
        "clone 3 leaves": lambda: [t.detach().clone().requires_grad_() for t in (a, p, n)],
        "validate arguments": lambda: (
            validation.check_infonce_inputs(a, p, n, al, nl),
            validation.check_infonce_options(k, 0.1, "topk", 0.0, None, "mean", None),
        ),
        "negative_tables, C++ op": lambda: negative_tables(al, nl, k, False, 0.0),
        "negative_tables, Python": lambda: negative_tables(al, nl, k, False, 0.0, use_extension=False),
        "stable sort of the selection keys": lambda: sort_key.sort(dim=1, descending=True, stable=True),
        "top-K of unique int64 keys": lambda: unique_key.topk(k, dim=1),
        "class order, one-program kernel": lambda: infonce_triton.class_order(labels, 2),
        "class order, sort op": lambda: anchor_class_order(labels, 2),
        "normalise both views": lambda: normalise_rows(z1, order, N, z2=z2),
        "Triton kernels, loss only": lambda: infonce_triton.voxel_infonce(z1, z2, zn, params),
        "Triton kernels, loss + grads": lambda: infonce_triton.voxel_infonce(
            z1, z2, zn, params, grad_scale=1.0 / N, pool_grad=True
        ),
        "mean Function (autograd node)": mean_function,
        "finite-input check (norms, one .item())": lambda: validation.all_finite(logits_total, (a, p, n)),
        "_foreach_mul_ of 3 grads": lambda: torch._foreach_mul_(grads, scale),
        "3 x mul_": lambda: [g.mul_(scale) for g in grads],
        "public call, no grad": no_grad_call,
        "public call + backward": step,
    }
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(
        f"{args.shape} shape, K={k}, {name}, torch {torch.__version__}, "
        f"triton {triton.__version__}; {args.calls} calls each"
    )
    print("| piece | host us/call | wall us/call |\n|---|---|---|")
    for name, fn in pieces.items():
        host, wall = time_calls(fn, args.calls, sync)
        print(f"| {name} | {host:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
