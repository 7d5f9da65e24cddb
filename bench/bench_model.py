"""Speed and memory: TensorMask R-50-FPN bipyramid vs torchvision Mask R-CNN R-50-FPN.

Same input (one image, default 512x512), random weights, 2 threads. The two models are
interleaved and each measurement repeated; medians are reported (the CPU may be shared).
Peak memory is measured in a fresh child process per (model, phase): peak RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU.

    python bench/bench_model.py                     # CPU, 512x512, 5 repeats
    python bench/bench_model.py --device cuda --repeats 20

Two inference settings are timed: "default" uses the models' own thresholds (with random
weights neither model keeps a detection, so no mask is computed), "100 dets" sets both score
thresholds to 0 so that both decode and paste 100 masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torchvision


def build_tensormask(device):
    from tensormask.modeling.detectron2_import import build_detectron2_tensormask

    return build_detectron2_tensormask(None, num_classes=80).to(device)


def build_maskrcnn(device, size):
    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size
    ).to(device)


def synthetic_targets(size, device):
    """Three rectangles with their masks (resized-image pixels)."""
    boxes = torch.tensor([[40.0, 60.0, 200.0, 220.0], [250.0, 100.0, 330.0, 170.0], [100.0, 300.0, 420.0, 480.0]])
    boxes = boxes * (size / 512)
    masks = torch.zeros(3, size, size, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        m[y0:y1, x0:x1] = 1
    return boxes.to(device), masks.to(device)


class Runner:
    def __init__(self, which, device, size, forced_dets=False):
        self.which, self.device, self.size = which, device, size
        torch.manual_seed(0)
        image = torch.rand(3, size, size, device=device) * 255
        boxes, masks = synthetic_targets(size, device)
        if which == "tensormask":
            self.model = build_tensormask(device)
            mean = torch.tensor(self.model.pixel_mean, device=device).view(3, 1, 1)
            self.images = ((image.flip(0) - mean) / torch.tensor(self.model.pixel_std, device=device).view(3, 1, 1))[None]
            self.targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 17], device=device), "masks": masks}]
            if forced_dets:
                self.model.score_threshold = -1.0
                self.model.nms_threshold = 1.0  # no suppression: 100 detections like Mask R-CNN
        else:
            self.model = build_maskrcnn(device, size)
            self.images = [image / 255]
            self.targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 17], device=device), "masks": masks}]
            if forced_dets:
                self.model.roi_heads.score_thresh = -1.0
        params = [p for p in self.model.parameters() if p.requires_grad]
        # lr 0: the step costs the same, and the random weights stay as they are between repeats
        self.opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def infer(self):
        self.model.eval()
        with torch.no_grad():
            if self.which == "tensormask":
                dets = self.model.predict(self.model(self.images), [(self.size, self.size)], [(self.size, self.size)])
                return len(dets[0])
            return len(self.model(self.images)[0]["scores"])

    def train_step(self):
        self.model.train()
        if self.which == "tensormask":
            losses = self.model.losses(self.model(self.images), self.targets, [(self.size, self.size)])
        else:
            losses = self.model(self.images, self.targets)
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, result


def _rss_mib(field):
    """VmRSS / VmHWM of this process in MiB (ru_maxrss would inherit the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(args, which, phase):
    """(memory after building the model, peak during one ``phase``) in MiB, in a fresh process."""
    device = torch.device(args.device)
    runner = Runner(which, device, args.size, forced_dets=phase == "infer100")
    fn = runner.train_step if phase == "train" else runner.infer
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        fn()
        return before, torch.cuda.max_memory_allocated() / 2**20
    before = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    fn()
    return before, _rss_mib("VmHWM")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args, *args.child)))
        return

    device = torch.device(args.device)
    if not args.skip_timing:
        time_both(args, device)
    if not args.skip_memory:
        memory_both(args, device)


def time_both(args, device):
    runners = {
        ("tensormask", "default"): Runner("tensormask", device, args.size),
        ("maskrcnn", "default"): Runner("maskrcnn", device, args.size),
        ("tensormask", "100 dets"): Runner("tensormask", device, args.size, forced_dets=True),
        ("maskrcnn", "100 dets"): Runner("maskrcnn", device, args.size, forced_dets=True),
    }
    times: dict[tuple[str, str], list[float]] = {}
    ndets: dict[tuple[str, str], int] = {}
    for key, r in runners.items():  # warm-up
        r.infer()
    for key in (("tensormask", "default"), ("maskrcnn", "default")):
        runners[key].train_step()
    for _ in range(args.repeats):
        for (which, setting), r in runners.items():
            dt, n = timed(r.infer, device)
            times.setdefault((which, "infer " + setting), []).append(dt)
            ndets[(which, setting)] = n
        for which in ("tensormask", "maskrcnn"):
            dt, _ = timed(runners[(which, "default")].train_step, device)
            times.setdefault((which, "train"), []).append(dt)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={args.threads} image={args.size}x{args.size} repeats={args.repeats} "
          f"torch={torch.__version__} torchvision={torchvision.__version__}")
    print(f"{'measurement':<24}{'TensorMask':>14}{'Mask R-CNN':>14}{'ratio TM/MRCNN':>16}")
    for phase in ("infer default", "infer 100 dets", "train"):
        tm, mr = med[("tensormask", phase)], med[("maskrcnn", phase)]
        print(f"{phase + ' (s)':<24}{tm:>14.3f}{mr:>14.3f}{tm / mr:>16.2f}")
    print(f"detections kept: default TM {ndets[('tensormask', 'default')]} / MRCNN {ndets[('maskrcnn', 'default')]}; "
          f"forced TM {ndets[('tensormask', '100 dets')]} / MRCNN {ndets[('maskrcnn', '100 dets')]}")


def memory_both(args, device):
    unit = "CUDA MiB allocated" if device.type == "cuda" else "MiB RSS"
    print(f"memory ({unit}, fresh process per cell): after building the model -> peak during one call")
    for phase in ("infer", "infer100", "train"):
        mem = {}
        for which in ("tensormask", "maskrcnn"):
            cmd = [sys.executable, __file__, "--device", args.device, "--size", str(args.size), "--threads",
                   str(args.threads), "--child", which, phase]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True)
            mem[which] = json.loads(result.stdout.strip().splitlines()[-1])
        (tb, tp), (mb, mp) = mem["tensormask"], mem["maskrcnn"]
        print(f"  {phase:<9} TensorMask {tb:6.0f} -> {tp:6.0f}   Mask R-CNN {mb:6.0f} -> {mp:6.0f}"
              f"   peak ratio {tp / mp:.2f}")


if __name__ == "__main__":
    main()
