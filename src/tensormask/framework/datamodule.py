"""The LightningDataModule: a COCO-format dataset (the synthetic default or COCO itself) -> `Batch`es."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Subset

from tensormask.framework.sampling import SeededDataset, ShardSampler, StreamSampler


def _transform_kwargs(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Config -> `build_transforms` kwargs: `min_size: [640, 800]` with `min_size_mode: range` is the
    uniform range (the 6x jitter), with `min_size_mode: choice` (default) a list of choices."""
    kwargs = dict(cfg or {})
    mode = kwargs.pop("min_size_mode", "choice")
    if mode not in ("choice", "range"):
        raise ValueError(f"min_size_mode must be 'choice' or 'range', got {mode!r}")
    size = kwargs.get("min_size")
    if isinstance(size, Sequence) and not isinstance(size, str):
        size = [int(s) for s in size]
        kwargs["min_size"] = tuple(size) if mode == "range" else (size[0] if len(size) == 1 else size)
    return kwargs


def _with_sizes(cfg: dict[str, Any] | None, min_size: Any, max_size: int | None) -> dict[str, Any]:
    """Transform kwargs with the data set's size pair filled in where they leave the sizes out."""
    kwargs = dict(cfg or {})
    if kwargs.get("min_size") is None and min_size not in (None, [None]):
        kwargs["min_size"] = min_size
    if kwargs.get("max_size") is None and max_size is not None:
        kwargs["max_size"] = max_size
    return kwargs


class DetectionDataModule(L.LightningDataModule):
    """Training and evaluation loaders over a COCO-format instance segmentation dataset.

    Args:
        num_classes: number of object classes K (checked against the dataset).
        train_images, train_annotations, val_images, val_annotations: the dataset's files; left
            out (None) when `synthetic` is given.
        synthetic: keyword arguments of `tensormask.data.make_synthetic_coco`; the dataset is written
            (or reused from the cache) in `prepare_data` and its paths used.
        min_size, max_size: the image sizes, short side and cap on the long side (docs/data.md
            "Image sizes"); they fill what `train_transforms` / `test_transforms` leave out.
        train_transforms, test_transforms: keyword arguments of `tensormask.data.build_transforms`.
        global_batch_size: images per optimisation step over all processes (divided by the world size).
        eval_batch_size: images per evaluation batch on each process.
        num_workers: loader worker processes per training process.
        pixel_mean, pixel_std, bgr: input normalisation (must match the model's weights).
        seed: seed of the sample order and of the augmentations.
        size_divisibility: pad images to a multiple of this (the model's `size_divisibility`).
        max_val_images: evaluate on the first N validation images only (None: all).
        eval_split: "val", or "train" to evaluate on the training images (overfitting checks).
        root: the dataset's root folder (for the record; the paths above are what is read).
        category_ids: the annotation file's categories that are classes (None: all of them);
            `tensormask.framework.data_config` fills it from the file at the start of a run.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        synthetic: dict[str, Any] | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        train_transforms: dict[str, Any] | None = None,
        test_transforms: dict[str, Any] | None = None,
        global_batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        pixel_mean: Sequence[float] = (103.53, 116.28, 123.675),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        bgr: bool = True,
        seed: int = 0,
        size_divisibility: int = 32,
        max_val_images: int | None = None,
        eval_split: str = "val",
        root: str | None = None,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if synthetic is None and not (train_annotations and val_annotations):
            raise ValueError("give either `synthetic` or the dataset's image folders and annotation files")
        self.num_classes = num_classes
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.paths = {
            "train_images": train_images, "train_annotations": train_annotations,
            "val_images": val_images, "val_annotations": val_annotations,
        }
        self.min_size, self.max_size = min_size, max_size
        self.train_transforms = _transform_kwargs(_with_sizes(train_transforms, [min_size], max_size))
        self.test_transforms = _transform_kwargs(_with_sizes(test_transforms, min_size, max_size))
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pixel_mean = list(pixel_mean)
        self.pixel_std = list(pixel_std)
        self.bgr = bgr
        self.seed = seed
        self.size_divisibility = size_divisibility
        self.max_val_images = max_val_images
        if eval_split not in ("val", "train"):
            raise ValueError(f"data.eval_split={eval_split!r}: must be one of val, train")
        self.eval_split = eval_split
        self.root = root
        self.category_ids = [int(c) for c in category_ids] if category_ids is not None else None
        self.train_dataset = None
        self.val_dataset = None

    # -- data on disk ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from tensormask.data import make_synthetic_coco

            make_synthetic_coco(**self._synthetic_kwargs())

    def _synthetic_kwargs(self) -> dict[str, Any]:
        """The synthetic set's arguments; a `fast_dev_run` of N batches (a smoke run) gets a set of
        just the images those batches read, not the full set (which takes a minute to draw)."""
        kwargs = dict(self.synthetic or {})
        batches = getattr(self.trainer, "fast_dev_run", 0) if self.trainer is not None else 0
        if batches:
            images = int(batches) * max(self.global_batch_size, self.eval_batch_size)
            for key in ("num_train", "num_val"):
                kwargs[key] = min(int(kwargs.get(key, images)), images)
        return kwargs

    def dataset_paths(self) -> dict[str, str]:
        """The dataset's image folders and annotation files (the synthetic set's: written if needed)."""
        return self._resolve_paths()

    def _resolve_paths(self) -> dict[str, str]:
        if self.synthetic is None:
            return dict(self.paths)
        from tensormask.data import make_synthetic_coco

        info = make_synthetic_coco(**{**self._synthetic_kwargs(), "progress": False})
        return {k: info[k] for k in self.paths}

    def setup(self, stage: str | None = None) -> None:
        from tensormask.data import CocoInstances, build_transforms

        paths = self._resolve_paths()
        if self.val_dataset is None:
            split = self.eval_split
            self.val_dataset = CocoInstances(
                paths[f"{split}_images"], paths[f"{split}_annotations"],
                transforms=build_transforms(False, **self.test_transforms), train=False, drop_empty=False,
                category_ids=self.category_ids,
            )
            if len(self.val_dataset.contiguous_to_coco) != self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but {self.val_dataset.annotation_file} has "
                    f"{len(self.val_dataset.contiguous_to_coco)} categories"
                )
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = CocoInstances(
                paths["train_images"], paths["train_annotations"],
                transforms=build_transforms(True, **self.train_transforms), train=True, drop_empty=True,
                category_ids=self.category_ids,
            )

    # -- loaders -----------------------------------------------------------------------------
    def _collator(self):
        from tensormask.data import Collator

        return Collator(self.size_divisibility, self.pixel_mean, self.pixel_std, self.bgr)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    @property
    def local_batch_size(self) -> int:
        rank, world = self._world()
        if self.global_batch_size % world:
            raise ValueError(
                f"data.global_batch_size={self.global_batch_size} is not divisible by the world size {world}"
            )
        return self.global_batch_size // world

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        start_step = self.trainer.global_step if self.trainer is not None else 0
        sampler = StreamSampler(
            len(self.train_dataset), global_batch_size=self.global_batch_size, rank=rank, world_size=world,
            seed=self.seed, start_step=start_step,
        )
        return DataLoader(
            SeededDataset(self.train_dataset), batch_size=self.local_batch_size, sampler=sampler,
            collate_fn=self._collator(), num_workers=self.num_workers, persistent_workers=False,
        )

    def eval_dataset(self):
        ds = self.val_dataset
        if self.max_val_images is not None:
            ds = Subset(ds, range(min(self.max_val_images, len(ds))))
        return ds

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        ds = self.eval_dataset()
        return DataLoader(
            ds, batch_size=self.eval_batch_size, sampler=ShardSampler(len(ds), rank=rank, world_size=world),
            collate_fn=self._collator(), num_workers=self.num_workers,
        )

    test_dataloader = val_dataloader
