"""Put each kind of bug that issue 18 lists into the code, one at a time, run the tests meant to
catch it, and put the code back (docs/testing.md "Bugs the suite must catch"). Run outside CI:

    python scripts/check_known_bugs.py            # every bug (~10 min on 2 cores)
    python scripts/check_known_bugs.py NMS loss:  # only the bugs whose name contains a word

Prints "caught" (and the first failing test) or "NOT CAUGHT" per bug; exits 1 if any is not caught.
The checkout's files are edited in place and restored even when interrupted (try/finally); run it on
a clean tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
M = "src/tensormask/modeling/"
CW, IW = "tests/modeling/test_criterion_worked.py", "tests/modeling/test_inference_worked.py"
PS = "tests/framework/test_paper_settings.py"
EP, DDP = "tests/framework/test_eval_predict.py", "tests/framework/test_ddp.py::test_two_process_evaluation_equals_one"
NMS_CALL = "keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)"
NMS_AT = "keep = nms_per_class(boxes, c.scores, c.labels, self.nms_threshold, self.max_detections)"

# (name, file, text, replacement, tests)
BUGS = [
    ("loss: mask loss left out of the optimised total", "src/tensormask/framework/lit_module.py",
     "loss = sum(losses.values())", 'loss = sum(v for k, v in losses.items() if k != "loss_mask")', [CW]),
    ("loss: mask loss left out of the criterion's losses", M + "losses.py",
     'losses["loss_mask"] = self.mask_loss(', "_dropped = self.mask_loss(", [CW]),
    ("loss: focal loss's logits and targets swapped", M + "losses.py",
     "sigmoid_focal_loss_star(logits, cls_targets,", "sigmoid_focal_loss_star(cls_targets, logits,", [CW]),
    ("loss: focal loss's alpha and gamma swapped", M + "losses.py",
     "cls_targets, self.focal_alpha, self.focal_gamma,", "cls_targets, self.focal_gamma, self.focal_alpha,", [CW]),
    ("loss: mask BCE's prediction and target swapped", M + "losses.py",
     "mask_bce_loss(pred, target, self.mask_pos_weight", "mask_bce_loss(target, pred, self.mask_pos_weight", [CW]),
    ("loss: mask BCE's pos_weight and loss_weight swapped", M + "losses.py",
     "self.mask_pos_weight, self.mask_loss_weight)", "self.mask_loss_weight, self.mask_pos_weight)", [CW]),
    ("loss: every positive given the first object's class", M + "losses.py",
     'target["labels"][positives.gt[mine]]] = 1.0', 'target["labels"][positives.gt[mine] * 0]] = 1.0', [CW]),
    ("loss: box target from another image's objects", M + "losses.py",
     "gt_boxes = all_boxes[counts.cumsum(0)[positives.image] + positives.gt]", "gt_boxes = all_boxes[positives.gt]", [CW]),
    ("post: NMS turned off", M + "inference.py", NMS_CALL, "keep = torch.argsort(scores, descending=True)", [IW]),
    ("post: class-agnostic NMS", M + "inference.py", NMS_CALL,
     "keep = batched_nms(boxes.float(), scores.float(), torch.zeros_like(labels), iou_threshold)", [IW]),
    ("post: NMS at IoU 0.6", M + "inference.py", NMS_AT, NMS_AT.replace("self.nms_threshold", "0.6"), [IW]),
    ("post: NMS at IoU 0.4", M + "inference.py", NMS_AT, NMS_AT.replace("self.nms_threshold", "0.4"), [IW]),
    ("post: rescale swaps x and y", M + "inference.py",
     "sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]\n    scaled = boxes",
     "sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]\n    scaled = boxes", [IW]),
    ("post: class-major reading of the class logits", M + "inference.py",
     "    scores = logits.flatten().sigmoid()\n", "    scores = logits.t().flatten().sigmoid()\n", [IW]),
    ("post: class-major reading of the head outputs", M + "windows.py",
     "x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2)", "x.view(n, channels, -1, h, w).permute(0, 3, 4, 2, 1)", [IW]),
    ("post: a large window's mask pasted over the whole window box", M + "inference.py",
     "boxes[j] = torch.tensor([x0 + u0 * cw, y0 + v0 * ch, x0 + u1 * cw, y0 + v1 * ch])",
     "boxes[j] = torch.tensor([x0, y0, x1, y1])", [IW]),
    ("settings: conf nms_threshold 0.6", "conf/model/tensormask.yaml", "nms_threshold: 0.5", "nms_threshold: 0.6", [PS]),
    ("settings: conf score_threshold 0.04", "conf/model/tensormask.yaml", "score_threshold: 0.05", "score_threshold: 0.04", [PS]),
    ("settings: conf spatial_thresh 2", "conf/model/tensormask.yaml", "spatial_thresh: 1.0", "spatial_thresh: 2.0", [PS]),
    ("settings: conf mask_pos_weight 1", "conf/model/tensormask.yaml", "mask_pos_weight: 1.5", "mask_pos_weight: 1.0", [PS]),
    ("settings: the model passes a constant nms_threshold", M + "tensormask.py",
     "nms_threshold=nms_threshold", "nms_threshold=0.5", [PS]),
    ("settings: the model passes a constant score_threshold", M + "tensormask.py",
     "score_threshold=score_threshold", "score_threshold=0.05", [PS]),
    ("settings: the model passes a constant spatial_thresh", M + "tensormask.py",
     "spatial_thresh=spatial_thresh)", "spatial_thresh=1.0)", [PS]),
    ("settings: the model passes a constant mask_pos_weight", M + "tensormask.py",
     "mask_pos_weight=mask_pos_weight", "mask_pos_weight=1.5", [PS]),
    ("framework: eval loads no weights", "src/tensormask/evaluate.py",
     "    source = load_model_weights(model, ckpt)", "    source = str(ckpt)", [EP]),
    ("framework: predict reads RGB as BGR", "src/tensormask/predict.py",
     'str(getattr(model, "input_format", "RGB")).upper() == "BGR")',
     'str(getattr(model, "input_format", "RGB")).upper() != "BGR")', [EP]),
    ("framework: DDP eval gathers rank 0's detections only", "src/tensormask/evaluation/coco_eval.py",
     "for preds, n_box_only in gathered:", "for preds, n_box_only in gathered[:1]:", [DDP]),
    ("reported: per-category AP of small objects", "src/tensormask/evaluation/coco_eval.py",
     "p = precision[:, :, k, 0, -1]", "p = precision[:, :, k, 1, -1]", ["tests/evaluation/test_coco_evaluator.py"]),
    ("reported: per-category AP of large objects", "src/tensormask/evaluation/coco_eval.py",
     "p = precision[:, :, k, 0, -1]", "p = precision[:, :, k, 3, -1]", ["tests/evaluation/test_coco_evaluator.py"]),
    ("reported: per-category AP within 10 detections per image", "src/tensormask/evaluation/coco_eval.py",
     "p = precision[:, :, k, 0, -1]", "p = precision[:, :, k, 0, 1]", ["tests/evaluation/test_coco_evaluator.py"]),
    ("reported: calibrated display threshold 0.55", "src/tensormask/evaluation/visualize.py",
     "DEFAULT_CALIBRATED_THRESHOLD = 0.6", "DEFAULT_CALIBRATED_THRESHOLD = 0.55", ["tests/evaluation/test_visualize.py"]),
    ("reported: calibrated display threshold 0.7", "src/tensormask/evaluation/visualize.py",
     "DEFAULT_CALIBRATED_THRESHOLD = 0.6", "DEFAULT_CALIBRATED_THRESHOLD = 0.7", ["tests/evaluation/test_visualize.py"]),
    ("reported: display threshold strict (>)", "src/tensormask/evaluation/visualize.py",
     "keep = scores >= threshold", "keep = scores > threshold", ["tests/evaluation/test_visualize.py"]),
]


def main(words: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    missed = 0
    for name, file, text, replacement, tests in BUGS:
        if words and not any(w in name for w in words):
            continue
        path = REPO / file
        original = path.read_text()
        if original.count(text) != 1:
            print(f"STALE: {name}: {text!r} is no longer in {file} exactly once; update this script", flush=True)
            missed += 1
            continue
        path.write_text(original.replace(text, replacement))
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                  cwd=REPO, env=env, capture_output=True, text=True)
        finally:
            path.write_text(original)
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        caught = proc.returncode == 1 and failed
        missed += not caught
        print(f"{'caught' if caught else 'NOT CAUGHT'}: {name} -> {failed[0] if failed else proc.stdout.splitlines()[-1:]}",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
