"""Reading an image file into the uint8 RGB tensor every part of the pipeline takes.

One reader for training, evaluation and prediction, so a file loads the same everywhere:
- 8-bit files (JPEG, PNG, BMP, TIFF, WebP, GIF; grey, palette, RGBA, CMYK) -> RGB;
- a file with an EXIF orientation (phone and camera photos stored sideways) is turned upright, as
  image viewers and annotation tools show it (and as the JSON's width / height record it);
- 16-bit files (common for microscopy and depth data; PNG or TIFF, grey or RGB) are scaled
  linearly from 0..65535 to 0..255 (value / 257, rounded), never clipped to white;
- anything else (32-bit integer or floating-point pixels, whose range the file does not state)
  raises an `ImageReadError` naming the file, as does a file that is not a decodable image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tensormask.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

# the suffixes tensormask-predict looks for in a folder; every one of them loads through `read_image`
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

_EXIF_ORIENTATION = 0x0112  # the EXIF tag of how the stored pixels are turned for display


def list_images(path: str | Path, key: str = "input") -> list[Path]:
    """The image file `path`, or the files of folder `path` with an image suffix, sorted by name.
    A missing path or a folder without images is a `MissingFileError` naming `key=path`."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        nested = sum(_count_images(sub) for sub in path.iterdir() if sub.is_dir())  # a COCO file's sub-folders
        where = (f"{nested} image(s) in its sub-folders are not read (give a sub-folder, or a COCO file's "
                 "images with annotations=<file>)") if nested else ""
        if not files:
            raise MissingFileError(f"{key}={path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                                   + (f"; {where}" if where else ""))
        if where:
            log.warning("%s=%s: %s", key, path, where)
        return files
    raise MissingFileError(f"{key}={path}: no such file or folder")


def _count_images(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:  # an unreadable folder: none counted
        return 0


class ImageReadError(UserError):
    """An image file that cannot be read as an 8-bit RGB image; the message names the file and why."""

    def __init__(self, file: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {file}: {reason}")
        self.file = Path(file)
        self.reason = reason


def _scale_16_bit(array: np.ndarray) -> np.ndarray:
    """uint16 values 0..65535 -> uint8 0..255, rounded (65535 / 257 = 255 exactly)."""
    return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)


def _to_rgb_array(pil: Image.Image, file: Path) -> np.ndarray:
    mode = pil.mode
    if mode in _16_BIT_MODES:
        grey = _scale_16_bit(np.asarray(pil).astype(np.uint16))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "I":
        # 32-bit integers: Pillow opens 16-bit grey PNGs in this mode; values within 0..65535 are
        # such a file, larger or negative ones have no range we could scale from
        array = np.asarray(pil)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ImageReadError(
                file, f"32-bit integer pixels ({int(array.min())}..{int(array.max())}) "
                "outside the 16-bit range; convert it to an 8- or 16-bit image"
            )
        grey = _scale_16_bit(array.astype(np.uint16))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageReadError(
            file, "floating-point pixels have no fixed range to scale to 8 bit; "
            "convert it to an 8- or 16-bit image"
        )
    return np.asarray(pil.convert("RGB"))


def read_image(file: str | os.PathLike) -> torch.Tensor:
    """The image stored in `file` as a uint8 (3, h, w) RGB tensor (see the module docstring).

    Raises FileNotFoundError for a missing file, `ImageReadError` (naming the file and the cause)
    for one that is not a readable image.
    """
    file = Path(file)
    try:
        with Image.open(file) as pil:
            pil.load()
            if pil.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                pil = ImageOps.exif_transpose(pil)  # the upright image, as shown to the annotator
            array = _to_rgb_array(pil, file)
    except FileNotFoundError:
        raise
    except ImageReadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageReadError(file, "not an image file Pillow can decode") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(file, str(e) or type(e).__name__) from e
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()  # a writable copy


class ImageFiles(torch.utils.data.Dataset):
    """Image files as unannotated dataset items (what `CocoInstances` yields, without objects).

    Item `i` is the file `files[i]` read by `read_image`, with `image_id = image_ids[i]` (default
    `i`; a COCO annotation file's ids for tensormask-predict's `annotations=`), passed through
    `transforms`; a file that cannot be read gives None (the `Collator` of tensormask-predict drops
    it) and a warning naming the file and the cause, so one bad file does not end a whole run.
    """

    def __init__(self, files: list[str | os.PathLike], transforms=None, image_ids: list[int] | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.transforms = transforms
        self.image_ids = list(range(len(self.files))) if image_ids is None else [int(i) for i in image_ids]
        if len(self.image_ids) != len(self.files) or len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("image_ids must give one distinct id per file")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def index_of(self, image_id: int) -> int:
        """The position in `files` of the item with `image_id`."""
        return self._index[int(image_id)]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> torch.Tensor:
        """The stored image, uint8 (3, h0, w0) RGB; raises `ImageReadError` / FileNotFoundError."""
        return read_image(self.files[index])

    def read_error(self, index: int) -> str | None:
        """Why file `index` cannot be read (None if it can)."""
        try:
            self.read(index)
        except (ImageReadError, FileNotFoundError) as e:
            return str(e)
        return None

    def __getitem__(self, index: int) -> dict | None:
        from torchvision import tv_tensors

        try:
            image = self.read(index)
        except (ImageReadError, FileNotFoundError) as e:
            log.warning("skipping %s", e)
            return None
        h, w = image.shape[-2:]
        item = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "image_id": self.image_ids[index],
            "orig_size": (int(h), int(w)),
        }
        return self.transforms(item) if self.transforms is not None else item
