"""GPU benchmark of the fused voxel InfoNCE (the GPU goals of docs/design.md section 6).

    python -m benchmarks.bench_infonce_gpu [--backends triton,cuda,torch,triton@reduce-overhead]
        [--repeats 20] [--quick]

Cases: the LA shape (1 x 64 x 28 x 28 x 20 anchors and pool, 2 classes) at K = 100, 400, 4096,
and full-resolution anchors (1 x 64 x 112 x 112 x 80) with K = 4096 (pool: --full-pool, LA by
default). For every case and implementation (the fused GPU backends, backend="torch" (plain
PyTorch in bounded tiles, the fallback where no fused backend serves a GPU), the plain-PyTorch
reference, the official-algorithm baseline of benchmarks/official_baseline.py, and the matmul
floor: the six N x C x K torch.mm products S = U N^T, P N, P^T U per direction at the same
precision), three phases:

- forward:  the loss alone, under torch.no_grad();
- backward: loss.backward() alone after an untimed forward (the fused mean path computes its
  gradients in forward, so its backward only scales them);
- both:     forward + backward, as in training.

``triton@reduce-overhead`` is the Triton backend under torch.compile(mode="reduce-overhead",
fullgraph=True): the whole call, selection and kernels, replayed as CUDA graphs, which removes
the host's per-launch cost that bounds the eager call at the LA shape. (The finite-input check
is skipped under torch.compile, so that call also makes no host sync.)

Time: CUDA events, median / min / max over --repeats after warm-up. Memory: peak
torch.cuda.max_memory_allocated() growth over the inputs during the phase (for CUDA-graph modes,
memory that the graph's private pool keeps between calls is not counted as growth).
Implementations that would not fit in GPU memory are skipped (and say so). Writes
benchmarks/results/infonce_gpu_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: Untimed rounds first: compilation, autotuning, the allocator, and for CUDA-graph modes one
#: eager warm-up run and the recording run.
WARMUP = 3
SHAPES = {"la": ((28, 28, 20), 64), "full": ((112, 112, 80), 64), "small": ((8, 8, 6), 16)}


def make_inputs(shape, pool_shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial, channels = SHAPES[shape]
    pool_spatial, _ = SHAPES[pool_shape]

    def feats(sp):
        return torch.randn(1, channels, *sp, generator=g).to(device=device, dtype=dtype)

    a, p, n = feats(spatial), feats(spatial), feats(pool_spatial)
    al = torch.randn(1, 2, *spatial, generator=g).to(device)
    nl = torch.randn(1, 2, *pool_spatial, generator=g).to(device)
    return a, p, n, al, nl


def numel(shape):
    out = 1
    for s in SHAPES[shape][0]:
        out *= s
    return out


def loss_callable(impl, k):
    """The loss of one implementation; ``backend@mode`` is that backend under
    ``torch.compile(mode=mode, fullgraph=True)`` ("reduce-overhead" replays CUDA graphs)."""
    import rcps_kernels as rk

    if impl == "official":
        from benchmarks.official_baseline import official_infonce

        return lambda a, p, n, al, nl: official_infonce(a, p, n, al, nl, num_negatives=k, temperature=0.1)
    backend, _, mode = impl.partition("@")

    def loss(a, p, n, al, nl):
        return rk.bidirectional_voxel_infonce(a, p, n, al, nl, num_negatives=k, temperature=0.1, backend=backend)

    if not mode:
        return loss
    compiled = torch.compile(loss, mode=mode, fullgraph=True)

    def compiled_step(*inputs):
        # Each call is a new training step: CUDA-graph outputs of the last one may be reused.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs)

    return compiled_step


def estimated_bytes(impl, n_anchors, n_pool, k, c, elem):
    if impl == "reference":  # (N, K, C) gathered negatives + einsum temporaries, with grads
        return n_anchors * k * c * 4 * 5
    if impl == "official":  # two (M, N) float masks + (K, N, C) gathers (x2 directions + grads)
        return n_pool * n_anchors * 4 * 3 + k * n_anchors * c * 4 * 6
    return n_anchors * c * 4 * 8 + n_pool * c * 4 * 4


def time_phase(fn, repeats, setup=None):
    """Median/min/max ms of fn() with CUDA events, and the peak memory growth over the inputs."""
    times = []
    peak = 0
    for r in range(repeats + WARMUP):
        state = setup() if setup else None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if r >= WARMUP:
            times.append(start.elapsed_time(end))
        del state
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "rounds": len(times),
        "peak_bytes": int(peak),
    }


def bench_impl(impl, inputs, k, repeats):
    fn = loss_callable(impl, k)
    a, p, n, al, nl = inputs

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (a, p, n)]

    def forward(_):
        with torch.no_grad():
            fn(a, p, n, al, nl)

    def both(_):
        x = leaves()
        fn(*x, al, nl).backward()

    def setup_backward():
        x = leaves()
        return fn(*x, al, nl)

    def backward(loss):
        loss.backward()

    return {
        "forward": time_phase(forward, repeats),
        "backward": time_phase(backward, repeats, setup_backward),
        "both": time_phase(both, repeats),
    }


def bench_floor(n_anchors, k, c, dtype, device, repeats):
    """The six products S = U N^T, P N, P^T U per direction, chunked over anchors if needed."""
    chunk = max(1, min(n_anchors, (2**28) // max(k, 1)))
    u = torch.randn(chunk, c, device=device, dtype=dtype)
    bank = torch.randn(k, c, device=device, dtype=dtype)
    prob = torch.randn(chunk, k, device=device, dtype=dtype)
    pieces = [min(chunk, n_anchors - s) for s in range(0, n_anchors, chunk)]

    def run(_):
        for rows in pieces:
            for _d in range(2):
                torch.mm(u[:rows], bank.t())
                torch.mm(prob[:rows], bank)
                torch.mm(prob[:rows].t(), u[:rows])

    res = time_phase(run, repeats)
    res["peak_bytes"] = 0  # operands are pre-allocated: the floor is a time reference only
    return {"both": res}


def device_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()


def write_results(out_dir: str, name: str, report: dict, markdown: str) -> None:
    """``<out_dir>/<name>_<device>.json`` and ``.md``, the layout of every GPU benchmark."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{device_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")


def to_markdown(report) -> str:
    lines = [
        f"# Voxel InfoNCE on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}, "
        f"{report['date']}, dtype {report['dtype']}",
        "",
        "| case | K | impl | phase | median ms | min-max ms | peak MiB over inputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for impl, phases in case["results"].items():
            if "skipped" in phases:
                lines.append(f"| {case['shape']} | {case['k']} | {impl} | - | skipped: {phases['skipped']} | | |")
                continue
            for phase, r in phases.items():
                lines.append(
                    f"| {case['shape']} | {case['k']} | {impl} | {phase} | "
                    f"{r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                    f"{r['peak_bytes'] / 2**20:.1f} |"
                )
        for key, value in case.get("ratios", {}).items():
            lines.append(f"| {case['shape']} | {case['k']} | ratio | {key} | {value:.2f} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backends",
        default="triton,cuda,torch,triton@reduce-overhead",
        help="backends to time (comma-separated); backend@mode runs it under torch.compile(mode=mode)",
    )
    parser.add_argument(
        "--baselines", default="reference,official,floor", help="baselines to time (comma-separated; empty for none)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--full-pool", default="la", choices=["la", "full"], help="pool shape of the full-resolution case"
    )
    parser.add_argument("--quick", action="store_true", help="only the LA shape at K=400")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_infonce_gpu needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    device = "cuda"
    cases = (
        [("la", "la", 400)]
        if args.quick
        else [("la", "la", 100), ("la", "la", 400), ("la", "la", 4096), ("full", args.full_pool, 4096)]
    )
    impls = [b for b in args.backends.split(",") if b]
    baselines = [b for b in args.baselines.split(",") if b]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "cases": [],
    }
    for shape, pool, k in cases:
        inputs = make_inputs(shape, pool, dtype, device)
        n_anchors, n_pool, c = numel(shape), numel(pool), SHAPES[shape][1]
        case = {"shape": shape, "pool": pool, "k": k, "anchors": n_anchors, "results": {}}
        for impl in impls + [b for b in baselines if b != "floor"]:
            free, _ = torch.cuda.mem_get_info()
            need = estimated_bytes(impl, n_anchors, n_pool, k, c, inputs[0].element_size())
            if need > 0.8 * free:
                case["results"][impl] = {"skipped": f"needs ~{need / 2**30:.1f} GiB"}
                continue
            try:
                case["results"][impl] = bench_impl(impl, inputs, k, args.repeats)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                torch.cuda.empty_cache()
                case["results"][impl] = {"skipped": f"{type(exc).__name__}: {str(exc)[:120]}"}
            print(json.dumps({"shape": shape, "k": k, "impl": impl, "result": case["results"][impl]}), flush=True)
        if "floor" in baselines:
            case["results"]["floor"] = bench_floor(n_anchors, k, c, dtype, device, args.repeats)
        fused = {b: case["results"][b]["both"]["median_ms"] for b in impls if "both" in case["results"].get(b, {})}
        if fused:
            fastest = min(fused, key=fused.get)
            ratios = {}
            for base in ("official", "reference", "floor"):
                r = case["results"].get(base, {})
                if "both" not in r:
                    continue
                for impl, ms in fused.items():
                    mark = ", fastest" if impl == fastest and len(fused) > 1 else ""
                    ratios[f"{base} / {impl} (both{mark})"] = r["both"]["median_ms"] / ms
            case["ratios"] = ratios
        report["cases"].append(case)
        # After every case, so that a run cut short by a time limit keeps what it measured.
        write_results(args.out_dir, "infonce_gpu", report, to_markdown(report))
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
