"""tensormask-export and its Hydra-free runner (tensormask.deploy): the exported model's detections equal eager's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from framework_helpers import TINY_MODEL, compose_config
from tensormask.deploy import ExportedModel, InferenceNetwork
from tensormask.errors import UserError
from tensormask.export import export
from tensormask.framework.builders import build_model

# random weights and no score threshold: the tiny model keeps (and decodes the masks of) many windows;
# images resized to 160-224 px
EXPORT_MODEL = [*TINY_MODEL, "model.score_threshold=0.0", "data.test_transforms.min_size=160",
                "data.test_transforms.max_size=224"]
IMAGE_SHAPES = [(3, 170, 230), (3, 256, 192), (3, 96, 100)]  # padded to 160x224, 224x160, 160x160 (pad to P7 >= 2)


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for shape in IMAGE_SHAPES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run folder (checkpoint + config.yaml) of the tiny model, and its export by tensormask-export."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", EXPORT_MODEL, run)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    classes = {"contiguous_to_coco": list(range(1, 1 + int(cfg.data.num_classes))),
               "class_names": [f"c{i}" for i in range(int(cfg.data.num_classes))]}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "classes": classes}, ckpt)
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(cfg.model, resolve=True),
                                     "data": OmegaConf.to_container(cfg.data, resolve=True)}), run / "config.yaml")
    # the run folder, as users name it (tensormask-export ckpt_path=outputs/train/latest): its last.ckpt
    export_cfg = compose_config("export", [f"ckpt_path={run}", "example_size=[256,288]", "aoti=false"],
                                run / "export")
    paths = export(export_cfg)
    return model, paths


def _eager(model, runner, image):
    batch, sizes, origs = runner.preprocess([image])
    with torch.no_grad():
        return model.predict(model(batch), sizes, origs)[0]


def test_exported_program_detections_equal_eager(exported):
    model, paths = exported
    assert sorted(p.name for p in paths.values()) == ["deploy.json", "program.pt2"]
    runner = ExportedModel(paths["program"].parent, use_program=True)
    for image in _images():
        (got,) = runner([image])
        want = _eager(model, runner, image)
        assert len(want) > 10  # (the masks of many windows at several levels are decoded)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.masks, want.masks)
        torch.testing.assert_close(got.boxes, want.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)


def test_no_align2nat_in_the_graph_and_fake_kernels_for_both_ops(exported):
    """The network graph decodes no mask (inference decodes only kept windows, after it); the ops a model
    may call densely have fake kernels, so a module calling them exports (their schema: ops/csrc)."""
    program = torch.export.load(str(exported[1]["program"]))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("tensormask" in t for t in targets)

    from tensormask import ops

    class Dense(torch.nn.Module):
        def forward(self, x):
            return ops.swap_align2nat(x, 2)

    x = torch.randn(1, 9, 8, 8)
    dense = torch.export.export(Dense(), (x,))
    assert any("tensormask.align2nat" in str(n.target) for n in dense.graph.nodes)
    torch.testing.assert_close(dense.module()(x), ops.swap_align2nat(x, 2))
    for op in ("align2nat", "align2nat_backward"):
        assert torch._library.simple_registry.singleton.find(f"tensormask::{op}").fake_impl.kernel is not None


def test_runner_predicts_on_a_folder_without_hydra_or_lightning(exported, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images()[:2]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "pred.json"
    probe = ("import sys; from tensormask.deploy import main; main(sys.argv[1:]); "
             "assert not {'hydra', 'lightning', 'omegaconf'} & set(sys.modules), 'framework imported'")
    done = subprocess.run([sys.executable, "-c", probe, str(exported[1]["program"].parent), str(folder), "--output",
                           str(out), "--program"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == {0, 1}
    assert all({"bbox", "score", "category_id", "segmentation"} <= set(r) for r in results)
    index = json.loads((tmp_path / "pred.images.json").read_text())
    assert [i["file_name"].rsplit("/", 1)[-1] for i in index["images"]] == ["0.png", "1.png"]


def test_export_errors_name_the_culprit(tmp_path, exported):
    with pytest.raises(UserError, match="nope.ckpt"):
        export(compose_config("export", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path))
    run = exported[1]["program"].parent.parent  # test resize up to 224 px
    for bad, named in (("aoti=no", "aoti='no': must be true or false"), ("max_size=big", "max_size='big'"),
                       ("example_size=512", "example_size=512: must be [height, width]")):
        with pytest.raises(UserError) as info:
            export(compose_config("export", [f"ckpt_path={run}", bad], tmp_path / "bad"))
        assert named in str(info.value)
    with pytest.raises(UserError, match=r"max_size=192: below .*max_size=224: up to 224 px"):
        export(compose_config("export", [f"ckpt_path={run}", "example_size=[160,160]", "max_size=192", "aoti=false"],
                              tmp_path / "small"))
    with pytest.raises(UserError, match="not an export folder"):
        ExportedModel(tmp_path)
    with pytest.raises(UserError, match="model.pt2: missing"):
        ExportedModel(exported[1]["program"].parent)
    model = exported[0]
    with pytest.raises(UserError, match="example_size"):
        from tensormask.export import export_program

        export_program(model, (100, 256))
    with pytest.raises(UserError, match=r"max_size=256: must be at least the example_size \[512, 512\]"):
        export_program(model, (512, 512), max_size=256)
    with pytest.raises(UserError, match="max_size=100: .* over 128 px"):
        export_program(model, (160, 160), max_size=100)
    assert InferenceNetwork(model).layout() == {"num_levels": 6, "num_windows": 2, "box_head": 1, "mask_head": 1}


@pytest.mark.slow
def test_aoti_package_detections_match_eager(exported, tmp_path):
    """The AOTInductor package (C++ compiled from the program: minutes on 2 cores) against eager. Its
    kernels fuse and reorder float arithmetic, so values agree to rounding, not bit for bit."""
    from tensormask.export import write_export

    model, paths = exported
    meta = json.loads(paths["deploy"].read_text())
    write_export(model, meta, tmp_path, example_size=(256, 288), aoti=True)
    runner = ExportedModel(tmp_path)
    for image in _images()[:2]:
        (got,) = runner([image])
        want = _eager(model, runner, image)
        assert len(want) > 10
        # the same detections, allowing near-ties in score order to swap
        order_got, order_want = got.scores.argsort(descending=True, stable=True), want.scores.argsort(descending=True, stable=True)
        assert len(got) == len(want)
        torch.testing.assert_close(got.scores[order_got], want.scores[order_want], rtol=0, atol=1e-4)
        for a, b in ((got, want), (want, got)):  # every detection has a twin: same label, box within 0.01 px
            gap = (a.boxes[:, None] - b.boxes[None]).abs().amax(-1) + 1e9 * (a.labels[:, None] != b.labels[None])
            assert gap.amin(1).max() < 1e-2
        agree = (got.masks.sum() + want.masks.sum()).item()
        assert agree == 0 or abs(got.masks.sum().item() - want.masks.sum().item()) / agree < 1e-3


def test_two_checkpoints_export_into_two_folders(exported, tmp_path, monkeypatch, capsys):
    """tensormask-export as a user runs it: one folder per checkpoint (as eval and predict), so exporting
    a second checkpoint never overwrites the first one's export; `outputs/export/latest` is the newest."""
    import shutil

    from hydra.core.global_hydra import GlobalHydra

    from tensormask.export import main

    run = exported[1]["program"].parent.parent
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step0000001.ckpt")
    monkeypatch.setenv("TENSORMASK_OUTPUT_DIR", str(tmp_path / "outputs"))
    folders = []
    for ckpt in (run, run / "checkpoints" / "step0000001.ckpt"):
        monkeypatch.setattr(sys, "argv", ["tensormask-export", f"ckpt_path={ckpt}", "aoti=false",
                                          "example_size=[256,288]"])
        GlobalHydra.instance().clear()
        main()
        GlobalHydra.instance().clear()
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("deploy:"))
        folders.append(Path(line.split(":", 1)[1].strip()).parent)
    assert folders[0] != folders[1] and all((f / "program.pt2").is_file() for f in folders)
    assert [json.loads((f / "deploy.json").read_text()) for f in folders][0]["layout"]
    assert (tmp_path / "outputs" / "export" / "latest").resolve() == folders[1].resolve()


def test_runner_refuses_an_output_it_cannot_write_before_predicting(exported, tmp_path):
    """A folder or an unwritable place as --output: a UserError naming it before any image runs (not a
    traceback after all the predictions)."""
    from tensormask.deploy import predict_folder

    folder = exported[1]["program"].parent
    with pytest.raises(UserError, match="a folder; give the results file"):
        predict_folder(folder, tmp_path / "no_images_here", tmp_path, use_program=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write there"):
        predict_folder(folder, tmp_path / "no_images_here", tmp_path / "file" / "pred.json", use_program=True)
