"""One image reader for training, evaluation and prediction: 16-bit files scaled, not clipped to white."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tensormask.data import CocoFormatError, CocoInstances
from tensormask.data.images import IMAGE_SUFFIXES, ImageReadError, read_image
from tensormask.errors import UserError

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]


def write_png_16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG, grey (h, w) or RGB (h, w, 3), written byte by byte (Pillow cannot write 16-bit RGB)."""
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    rows = pixels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _ramp16(h=20, w=30):
    return (np.arange(h * w).reshape(h, w) * (65535 // (h * w - 1))).astype(np.uint16)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = _ramp16()
    write_png_16(tmp_path / "grey16.png", ramp)
    image = read_image(tmp_path / "grey16.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for c in range(3):
        assert torch.equal(image[c], expected)
    assert image.float().mean() < 140  # the ramp's middle, not clipped to white (255)
    assert int(image.max()) > 250 and int(image.min()) == 0


def test_16_bit_rgb_png_is_scaled(tmp_path):
    ramp = _ramp16()
    rgb = np.stack([ramp, ramp // 2, 65535 - ramp], axis=-1)
    write_png_16(tmp_path / "rgb16.png", rgb)
    image = read_image(tmp_path / "rgb16.png").permute(1, 2, 0).numpy().astype(np.int32)
    np.testing.assert_allclose(image, rgb / 257.0, atol=1.0)


def test_16_bit_tiff_is_scaled(tmp_path):
    ramp = _ramp16()
    Image.fromarray(ramp).save(tmp_path / "grey16.tif")
    image = read_image(tmp_path / "grey16.tif")
    assert torch.equal(image[0], torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8)))


def test_float_image_and_garbage_are_named_errors(tmp_path):
    Image.fromarray(np.ones((4, 5), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match=r"cannot read image .*float\.tif: floating-point pixels"):
        read_image(tmp_path / "float.tif")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match=r"cannot read image .*text\.png: not an image file Pillow can decode"):
        read_image(tmp_path / "text.png")
    Image.fromarray(np.full((40, 50, 3), 7, np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(ImageReadError, match=r"trunc\.png"):
        read_image(tmp_path / "trunc.png")


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_listed_suffix_loads(tmp_path, suffix):
    pixels = np.zeros((12, 16, 3), np.uint8)
    pixels[:, :8] = (200, 30, 60)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path, **({"quality": 100} if suffix in (".jpg", ".jpeg", ".webp") else {}))
    image = read_image(path)
    assert image.shape == (3, 12, 16)
    assert abs(int(image[0, 6, 2]) - 200) <= 8 and int(image[0, 6, 12]) <= 8


def test_training_and_evaluation_datasets_scale_16_bit_images(coco_writer):
    coco_writer.add_image(1, 20, 30)
    coco_writer.add_ann(101, 1, 5, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    ramp = _ramp16()
    write_png_16(coco_writer.image_dir / "000001.png", ramp)
    image_dir, ann = coco_writer.write()
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for train in (True, False):
        image = CocoInstances(image_dir, ann, train=train)[0]["image"]
        assert torch.equal(image.as_subclass(torch.Tensor)[1], expected)


def test_dataset_names_an_unreadable_16_bit_kind(coco_writer):
    coco_writer.add_image(1, 4, 5)
    coco_writer.add_ann(101, 1, 5, SQUARE, bbox=[0.0, 0.0, 3.0, 3.0])
    Image.fromarray(np.ones((4, 5), np.float32)).save(coco_writer.image_dir / "000001.png".replace(".png", ".tif"))
    (coco_writer.image_dir / "000001.tif").rename(coco_writer.image_dir / "000001.png")
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"cannot decode image .*000001\.png \(image id 1 in .*\): floating-point"):
        CocoInstances(image_dir, ann, train=True)[0]


def test_32_bit_integer_grey_within_16_bits_is_scaled(tmp_path):
    # Pillow's mode "I" (32-bit integers; some Pillow versions open 16-bit grey PNGs so): values
    # within 0..65535 are scaled like 16-bit ones
    ramp = _ramp16().astype(np.int32)
    Image.fromarray(ramp, mode="I").save(tmp_path / "grey32.tif")
    with Image.open(tmp_path / "grey32.tif") as pil:
        assert pil.mode == "I"
    image = read_image(tmp_path / "grey32.tif")
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for c in range(3):
        assert torch.equal(image[c], expected)


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    # a phone photo: pixels stored sideways, EXIF orientation 6 ("rotate 90 degrees clockwise to
    # display"); annotation tools show and record it upright, so it is read upright (as detectron2 does)
    upright = np.zeros((16, 40, 3), np.uint8)
    upright[:, :8] = (250, 0, 0)  # the left edge is red
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # (40, 16): the red edge at the bottom
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = read_image(tmp_path / "phone.jpg")
    assert image.shape == (3, 16, 40)
    assert int(image[0, 8, 2]) > 200 and int(image[0, 8, 30]) < 50


def test_dataset_reads_an_exif_rotated_jpeg_at_its_json_size(coco_writer):
    coco_writer.add_image(1, 16, 40)  # (h, w) as the annotation tool saw it: upright
    coco_writer.add_ann(101, 1, 5, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((40, 16, 3), np.uint8)).save(coco_writer.image_dir / "000001.png".replace(
        ".png", ".jpg"), exif=exif.tobytes())
    (coco_writer.image_dir / "000001.jpg").rename(coco_writer.image_dir / "000001.png")
    image_dir, ann = coco_writer.write()
    assert CocoInstances(image_dir, ann, train=False)[0]["image"].shape == (3, 16, 40)


def test_a_folder_of_sub_folders_says_where_its_images_are(tmp_path, caplog):
    # a COCO data set's image folder with its images in sub-folders: predict's input= reads one
    # folder, so it names the images it does not read instead of ignoring them silently
    import logging

    from tensormask.data.images import list_images
    from tensormask.errors import MissingFileError

    (tmp_path / "cam1").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cam1" / "a.png")
    with pytest.raises(MissingFileError, match=r"no images .* in this folder; 1 image\(s\) in its sub-folders are not "
                                               r"read \(give a sub-folder, or a COCO file's images with annotations="):
        list_images(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING, logger="tensormask.data.images"):
        assert list_images(tmp_path) == [tmp_path / "b.png"]
    assert "1 image(s) in its sub-folders are not read" in caplog.text
