"""CPU latency of an exported TensorMask (tensormask-export's AOTInductor package and torch.export program)
against eager PyTorch, end to end per image (resize, normalise, pad, network, post-processing).

The model is built from the configs (default: the quickstart's model=tensormask_small, random weights, the
default thresholds) and exported once (dynamic height and width); then, for each --sizes S, one S x S image is run through eager, the program and the package, interleaved, --repeats times; medians.
The package's load time (torch._inductor.aoti_load_package) and compile time are printed too.

    .venv/bin/python bench/bench_export.py --sizes 512 800 --threads 2
    .venv/bin/python bench/bench_export.py --export-dir outputs/export/runs/x   # reuse an export folder
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tensormask.data import ResizeShortestEdge
from tensormask.deploy import DEPLOY_JSON, ExportedModel
from tensormask.export import deploy_metadata, write_export
from tensormask.framework.builders import build_model
from tensormask.framework.entry import config_dir


def build(model_choice: str, size: int):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", [f"model={model_choice}", f"data.test_transforms.min_size={size}",
                                f"data.test_transforms.max_size={max(size, 1333)}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return cfg, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tensormask_small", help="a conf/model choice")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--export-dir", default=None, help="export here (kept) instead of a temporary folder")
    parser.add_argument("--no-aoti", action="store_true", help="time the torch.export program only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model = build(args.model, max(args.sizes))
    folder = Path(args.export_dir or tempfile.mkdtemp(prefix="tensormask_export_"))
    compile_s = None
    if not (folder / DEPLOY_JSON).is_file():
        t0 = time.perf_counter()
        example = max(args.sizes) // 32 * 32 + 32 * (max(args.sizes) // 32 % 2 == 0)  # an odd multiple of 32
        write_export(model, deploy_metadata(cfg, model, {}), folder, (example, example), aoti=not args.no_aoti)
        compile_s = time.perf_counter() - t0
    runners = {"eager": None, "program": ExportedModel(folder, use_program=True)}
    if not args.no_aoti:
        runners["package"] = ExportedModel(folder)
    print(f"# {args.model}, random weights, {args.threads} threads, torch {torch.__version__}; export folder {folder}"
          + (f"; export + compile {compile_s:.1f} s" if compile_s is not None else ""))
    print("# load (s): " + ", ".join(f"{k} {r.load_seconds:.2f}" for k, r in runners.items() if r is not None))
    any_runner = runners["program"]
    print("| image (after resize) | " + " | ".join(f"{k} (s)" for k in runners) + " | "
          + " | ".join(f"{k} / eager" for k in runners if k != "eager") + " | detections (eager) |")
    print("|---|" + "---|" * (2 * len(runners)))
    for size in args.sizes:
        for r in runners.values():
            if r is not None:  # the image is already at its size: resizing leaves it as it is
                r.resize = ResizeShortestEdge(size, max(size, 1333))
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))

        def eager():
            batch, sizes, origs = any_runner.preprocess([image])
            with torch.no_grad():
                return model.predict(model(batch), sizes, origs)[0]

        fns = {"eager": eager, **{k: (lambda r=r: r([image])[0]) for k, r in runners.items() if r is not None}}
        for fn in fns.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                dets = fn()
                times[k].append(time.perf_counter() - t0)
                if k == "eager":
                    n = len(dets)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {size}x{size} | " + " | ".join(f"{med[k]:.3f}" for k in fns) + " | "
              + " | ".join(f"{med[k] / med['eager']:.2f}" for k in fns if k != "eager") + f" | {n} |", flush=True)


if __name__ == "__main__":
    main()
