"""Under torch.distributed (two CPU processes, gloo) every rank gets the single-process numbers."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tensormask.data import CocoInstances, make_synthetic_coco
from tensormask.evaluation import COCOEvaluator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, info, out_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from eval_helpers import noisy_predictions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = CocoInstances(info["val_images"], info["val_annotations"], train=False)
        # a DistributedSampler's split of 5 images over 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets
        # 1, 3 and image 0 again as padding; the repeat must count once
        indices = list(range(len(ds)))[rank::world]
        if rank == 1:
            indices.append(0)
        ev = COCOEvaluator(ds.coco, ds.contiguous_to_coco, output_dir=out_dir if rank == 0 else None)
        for i in indices:
            ev.process([ds.image_ids[i]], [noisy_predictions(ds, i)])
        torch.save(ev.evaluate(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_single_process(tmp_path):
    from eval_helpers import noisy_predictions

    info = make_synthetic_coco(
        tmp_path / "s", seed=2, num_train=1, num_val=5, image_size=96, min_object_size=8, progress=False
    )
    ds = CocoInstances(info["val_images"], info["val_annotations"], train=False)
    single = COCOEvaluator(ds.coco, ds.contiguous_to_coco)
    for i in range(len(ds)):
        single.process([ds.image_ids[i]], [noisy_predictions(ds, i)])
    expected = single.evaluate()

    mp.spawn(_worker, args=(2, _free_port(), info, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for t in expected:
            for k, v in expected[t].items():
                assert (math.isnan(v) and math.isnan(got[t][k])) or got[t][k] == pytest.approx(v, abs=1e-12), (rank, t, k)
    assert 0.0 < expected["segm"]["AP"] < 1.0
    assert (tmp_path / "coco_instances_results.json").is_file()
