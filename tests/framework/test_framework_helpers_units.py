"""Small framework helpers a sampled mutation run found untested by the fast tests (docs/testing.md
"Mutation testing"): number bounds of the config validation, the transforms' short-side options,
the torchvision ImageNet file lookup."""

from tensormask.framework.datamodule import _transform_kwargs
from tensormask.framework.pretrained import imagenet_file
from tensormask.framework.validation import _float


def test_number_bounds():
    at_least_zero, above_zero = _float(lo=0.0), _float(lo=0.0, lo_open=True)
    assert at_least_zero(0.0) is None and at_least_zero(2) is None
    assert at_least_zero(-1e-9) is not None and above_zero(0.0) is not None and above_zero(1e-9) is None
    at_most_one = _float(hi=1.0)
    assert at_most_one(1.0) is None and at_most_one(1.5) is not None and at_most_one(-5) is None
    assert _float()(True) is not None and _float(none_ok=True)(None) is None and _float()(None) is not None


def test_short_side_options():
    assert _transform_kwargs({"min_size": [640, 800], "min_size_mode": "range", "max_size": 1333}) == {
        "min_size": (640, 800), "max_size": 1333}
    assert _transform_kwargs({"min_size": [640, 672, 704]}) == {"min_size": [640, 672, 704]}
    assert _transform_kwargs({"min_size": [800], "min_size_mode": "choice"}) == {"min_size": 800}
    assert _transform_kwargs({"min_size": 800}) == {"min_size": 800} and _transform_kwargs(None) == {}


def test_torchvision_imagenet_file(tmp_path):
    assert imagenet_file(None, "torchvision", 50) is None
    assert imagenet_file(tmp_path, "msra", 50) == str(tmp_path / "R-50.pkl")
    pattern = str(tmp_path / "resnet50-*.pth")
    assert imagenet_file(tmp_path, "torchvision", 50) == pattern  # none there: the pattern, for the error
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"")
    (tmp_path / "resnet101-63fe2227.pth").write_bytes(b"")
    assert imagenet_file(tmp_path, "torchvision", 50) == str(tmp_path / "resnet50-0676ba61.pth")
    (tmp_path / "resnet50.pth").write_bytes(b"")
    assert imagenet_file(tmp_path, "torchvision", 50) == pattern  # two candidates: neither is chosen
