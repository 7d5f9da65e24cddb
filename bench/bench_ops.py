"""Benchmark of swap_align2nat (the tensor-bipyramid op): compiled kernels vs reference vs copy floor.

For each shape it times, in one process:
  extension forward, backward (the registered backward op alone) and forward+backward (through autograd);
  the pure-PyTorch reference's forward, backward and forward+backward (autograd);
  the memory-copy floor: copying x and the output once each (dst.copy_(src), same dtype and device).
and prints the ratios fwd+bwd / copy floor and reference / extension (fwd+bwd). Each time is the fastest
of --repeats runs (the least disturbed on a shared machine); the whole measurement is done --rounds
times and the table reports the medians over rounds, of the times and of the per-round ratios.

    .venv/bin/python bench/bench_ops.py                    # CPU, the default shapes
    .venv/bin/python bench/bench_ops.py --threads 1 --clock cpu   # CPU time, robust on a shared machine
    .venv/bin/python bench/bench_ops.py --device cuda      # the CUDA kernels against their copy floor

A second table times the op as a user's process calls it: one bipyramid level of an 800x1216 image
(x (1, 225, 200, 304), lambda 2, 2 threads, fresh outputs each call through autograd), each in a fresh
child process that only imports the package, once with the package's malloc settings
(src/tensormask/allocator.py) and once with glibc's defaults (TENSORMASK_MALLOC=0), alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

# (N, S, H, W, lambda): the P2-resolution bipyramid features of an ~384 px image, 15x15 and 11x11
# windows at levels 1 and 2.
DEFAULT_SHAPES = ["2,15,96,96,2", "2,11,96,96,2", "2,15,96,96,4", "2,15,48,48,1"]


DEFAULT_PROCESS_SHAPE = "1,15,200,304,2"  # one bipyramid level of an 800x1216 image (P2: 200x304)


def _load_package(malloc_defaults: bool):
    """Import tensormask (which sets its malloc thresholds at import unless TENSORMASK_MALLOC=0)."""
    global ops, backend, swap_geometry, align2nat_reference
    if malloc_defaults:
        os.environ["TENSORMASK_MALLOC"] = "0"
    import tensormask.ops as ops
    from tensormask.ops import backend
    from tensormask.ops.geometry import swap_geometry
    from tensormask.ops.reference import align2nat_reference
    from tensormask import allocator

    return allocator.state


def _timer(device: torch.device, clock: str):
    now = time.process_time if clock == "cpu" else time.perf_counter

    def measure(fn, repeats: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = now()
                fn()
                times.append(now() - t0)
        # The fastest run is the least disturbed one: the machine is shared, the kernels are deterministic.
        return min(times)

    return measure


def bench_shape(n, s, h, w, lam, dtype, device, repeats, ref_repeats, skip_reference, clock):
    measure = _timer(device, clock)
    geom = swap_geometry(s, lam)
    out_size = geom.output_size((h, w))
    x = torch.randn(n, s * s, h, w, dtype=dtype, device=device)
    x_grad = x.clone().requires_grad_()
    out = ops.swap_align2nat(x, lam)
    grad_out = torch.randn_like(out)
    op_args = ([s, s], list(geom.out_cells))

    def ext_forward():
        return torch.ops.tensormask.align2nat(x, *op_args, list(out_size), *geom.units, -6.0, "bilinear")

    def ext_backward():
        return torch.ops.tensormask.align2nat_backward(grad_out, *op_args, [h, w], *geom.units, "bilinear")

    def ext_both():
        x_grad.grad = None
        ops.swap_align2nat(x_grad, lam).backward(grad_out)

    x_copy, out_copy = torch.empty_like(x), torch.empty_like(out)

    def copy_floor():
        x_copy.copy_(x)
        out_copy.copy_(out)

    row = {
        "ext_fwd": measure(ext_forward, repeats),
        "ext_bwd": measure(ext_backward, repeats),
        "ext_both": measure(ext_both, repeats),
        "copy": measure(copy_floor, repeats),
    }
    if not skip_reference:
        def ref_forward():
            with torch.no_grad():
                return align2nat_reference(x, geom, out_size, -6.0, "bilinear")

        def ref_both():
            x_grad.grad = None
            align2nat_reference(x_grad, geom, out_size, -6.0, "bilinear").backward(grad_out)

        row["ref_fwd"] = measure(ref_forward, ref_repeats)
        row["ref_both"] = measure(ref_both, ref_repeats)
        row["ref_bwd"] = max(row["ref_both"] - row["ref_fwd"], 0.0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N,S,H,W,lambda (x is (N, S*S, H, W))")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ref-repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="CPU timing: wall clock, or process CPU time (with --threads 1: robust to a shared machine)",
    )
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc defaults (TENSORMASK_MALLOC=0, see src/tensormask/allocator.py)")
    parser.add_argument("--default-process-shape", default=DEFAULT_PROCESS_SHAPE, metavar="N,S,H,W,lambda",
                        help="shape of the second table (the op in a plain process, with / without the package's "
                             "malloc settings)")
    parser.add_argument("--default-process-threads", type=int, default=2)
    parser.add_argument("--skip-default-process", action="store_true", help="only the first table")
    parser.add_argument("--default-process-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.default_process_child:
        print(json.dumps(default_process_child(args)))
        return
    allocator = _load_package(args.malloc_defaults)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if not backend.has_kernel(device.type):
        raise SystemExit(f"no compiled {device.type} kernel: {backend.backend_summary()}")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# swap_align2nat, {args.dtype}, {name}, torch {torch.__version__}; {ops.backend_summary()}; {allocator}")
    clock = "CUDA events" if device.type == "cuda" else f"{args.clock} clock"
    print(f"# median over {args.rounds} rounds of the fastest of {args.repeats} repeats "
          f"(reference: {args.ref_repeats}); ms, {clock}")
    print("# copy floor = x.copy_() + out.copy_() into preallocated tensors (reads and writes x and the output once "
          "each); the extension times include allocating their results; fwd+bwd runs through autograd")
    header = ("x shape", "lambda", "out shape", "ext fwd", "ext bwd", "ext fwd+bwd", "copy floor",
              "ref fwd", "ref bwd", "ref fwd+bwd", "fwd+bwd / copy", "ref / ext")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for spec in args.shapes:
        n, s, h, w, lam = (int(t) for t in spec.split(","))
        rounds = [
            bench_shape(n, s, h, w, lam, dtype, device, args.repeats, args.ref_repeats, args.skip_reference,
                        args.clock)
            for _ in range(args.rounds)
        ]
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        ratio_copy = statistics.median(r["ext_both"] / r["copy"] for r in rounds)
        ms = lambda k: f"{med[k] * 1e3:.2f}" if k in med else "-"  # noqa: E731
        ratio_ref = (
            f"{statistics.median(r['ref_both'] / r['ext_both'] for r in rounds):.0f}x" if "ref_both" in med else "-"
        )
        out_shape = (n, (lam * s) ** 2, -(-h // lam), -(-w // lam))
        cells = (f"({n}, {s * s}, {h}, {w})", str(lam), str(out_shape), ms("ext_fwd"), ms("ext_bwd"), ms("ext_both"),
                 ms("copy"), ms("ref_fwd"), ms("ref_bwd"), ms("ref_both"), f"{ratio_copy:.2f}x", ratio_ref)
        print("| " + " | ".join(cells) + " |", flush=True)
    if not args.skip_default_process and device.type == "cpu":
        default_process_table(args)


def default_process_child(args) -> dict:
    """In this fresh process (the package imported as a user imports it): fwd+bwd through autograd with fresh
    outputs each call, the copy floor, and the page faults per fwd+bwd call."""
    allocator = _load_package(malloc_defaults=False)  # TENSORMASK_MALLOC comes from the parent
    torch.set_num_threads(args.default_process_threads)
    n, s, h, w, lam = (int(t) for t in args.default_process_shape.split(","))
    measure = _timer(torch.device("cpu"), args.clock)
    x = torch.randn(n, s * s, h, w).requires_grad_()
    out = ops.swap_align2nat(x, lam).detach()
    grad_out = torch.randn_like(out)
    x_copy, out_copy = torch.empty_like(x), torch.empty_like(out)

    def both():
        x.grad = None
        ops.swap_align2nat(x, lam).backward(grad_out)

    def copy_floor():
        x_copy.copy_(x.detach())
        out_copy.copy_(out)

    both()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_both = measure(both, args.repeats)  # (one warm-up call + the repeats)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.repeats + 1)
    return {"allocator": allocator, "both": t_both, "copy": measure(copy_floor, args.repeats), "faults": faults}


def default_process_table(args) -> None:
    n, s, h, w, lam = (int(t) for t in args.default_process_shape.split(","))
    out_shape = (n, (lam * s) ** 2, -(-h // lam), -(-w // lam))
    cmd = [sys.executable, os.path.abspath(__file__), "--default-process-child", "--default-process-shape",
           args.default_process_shape, "--default-process-threads", str(args.default_process_threads),
           "--repeats", str(args.repeats), "--clock", args.clock]
    base_env = {k: v for k, v in os.environ.items() if k != "TENSORMASK_MALLOC"}
    settings = {"package malloc settings": base_env, "glibc defaults (TENSORMASK_MALLOC=0)":
                dict(base_env, TENSORMASK_MALLOC="0")}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):  # the two settings alternate, a fresh process each time
        for name, env in settings.items():
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"default-process child failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print()
    print(f"# the op as a plain process calls it: x ({n}, {s * s}, {h}, {w}), lambda {lam}, "
          f"{args.default_process_threads} threads, fresh outputs each call (fwd+bwd through autograd); "
          f"a fresh process per cell, the two settings alternating; median over {args.rounds} rounds of the "
          f"fastest of {args.repeats} repeats; ms, {args.clock} clock")
    header = ("allocator", "x shape", "lambda", "out shape", "threads", "ext fwd+bwd", "copy floor",
              "fwd+bwd / copy", "page faults per fwd+bwd")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for rounds in results.values():
        cells = (rounds[0]["allocator"], f"({n}, {s * s}, {h}, {w})", str(lam), str(out_shape),
                 str(args.default_process_threads), f"{statistics.median(r['both'] for r in rounds) * 1e3:.2f}",
                 f"{statistics.median(r['copy'] for r in rounds) * 1e3:.2f}",
                 f"{statistics.median(r['both'] / max(r['copy'], 1e-9) for r in rounds):.2f}x",
                 f"{statistics.median(r['faults'] for r in rounds):.0f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
