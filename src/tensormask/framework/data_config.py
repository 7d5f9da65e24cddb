"""The data config checked and completed before anything heavy (no synthetic generation, no model
build): every path exists, and the classes come from the annotation file (docs/data.md "Your own data").

- A missing image folder or annotation file ends the run with one line naming the path and the key
  that sets it (`data.root` when the path is its standard layout).
- `data.num_classes: null` (data=coco's default) is the number of categories the training
  annotations use; `data.category_ids: null` is those categories. A category no annotation uses
  (files written by other tools often list a 'background' category with id 0) is reported by name
  and left out of the classes; giving `data.num_classes` = all the file's categories keeps it.
Both are written into the config (and so into the run's saved config.yaml, which eval and predict
rebuild the model and data from).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from omegaconf import DictConfig, OmegaConf, open_dict

from tensormask.errors import UserError

log = logging.getLogger(__name__)

PATH_KEYS = {"train_images": "dir", "train_annotations": "file", "val_images": "dir", "val_annotations": "file"}


def _set_by(data: DictConfig, key: str) -> str:
    """The key(s) to name for `data.<key>`: `data.root` too when the path is built from it."""
    raw = OmegaConf.to_container(data, resolve=False).get(key)
    if isinstance(raw, str) and "data.root" in raw:
        return f"data.{key}, set from data.root={data.get('root')}"
    return f"data.{key}"


def check_data_paths(data: DictConfig, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Path]:
    """The image folders and annotation files of `splits`, each checked to exist (UserError otherwise)."""
    paths = {}
    for key, kind in PATH_KEYS.items():
        if key.split("_")[0] not in splits:
            continue
        value = data.get(key)
        if value is None or str(value) == "":
            raise UserError(f"data.{key} is not set: give the dataset's {key.replace('_', ' ')} "
                            f"(or data.root=<folder> for the COCO layout; docs/data.md 'Your own data')")
        path = Path(str(value)).expanduser()
        ok = path.is_dir() if kind == "dir" else path.is_file()
        if not ok:
            what = "image folder" if kind == "dir" else "annotation file"
            found = " (it is a folder)" if kind == "file" and path.is_dir() else (
                " (it is a file)" if kind == "dir" and path.is_file() else "")
            raise UserError(f"{what} not found: {path}{found} ({_set_by(data, key)})")
        paths[key] = path
    return paths


def annotation_categories(annotation_file: str | Path) -> tuple[dict[int, str], set[int]]:
    """({category id: name} of the file, the ids some annotation uses); errors name the file."""
    from tensormask.data.coco import load_coco_json

    try:
        data = load_coco_json(annotation_file)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise UserError(f"{annotation_file}: category record without an integer 'id': {str(c)[:200]}")
        cats[int(c["id"])] = str(c.get("name", c["id"]))
    used = {a.get("category_id") for a in data["annotations"] if isinstance(a, dict)}
    return cats, {c for c in used if c in cats}


def resolve_classes(data: DictConfig, annotation_file: Path) -> tuple[int, list[int]]:
    """(num_classes, category ids) for `data` from `annotation_file` (see the module docstring)."""
    given_ids = data.get("category_ids")
    given_num = data.get("num_classes")
    cats, used = annotation_categories(annotation_file)
    if given_ids is not None:
        ids = [int(c) for c in given_ids]
        unknown = [c for c in ids if c not in cats]
        if unknown:
            raise UserError(f"data.category_ids={ids}: {annotation_file} has no categories {unknown} "
                            f"(it has {sorted(cats)})")
        return (len(ids) if given_num is None else int(given_num)), sorted(ids)
    if not used:
        raise UserError(f"{annotation_file}: no annotation uses any of its {len(cats)} categories")
    unused = sorted(set(cats) - used)
    names = ", ".join(f"'{cats[c]}' (id {c})" for c in unused)
    if given_num is not None and int(given_num) == len(cats) and unused:
        log.warning("%s: no annotation uses %s; kept as class(es) because data.num_classes=%d counts every "
                    "category of the file", annotation_file, names, len(cats))
        return len(cats), sorted(cats)
    if given_num is not None and int(given_num) != len(used):
        raise UserError(
            f"data.num_classes={given_num} but {annotation_file} has {len(used)} categories in use"
            + (f" ({len(cats)} with {names}, which no annotation uses)" if unused else "")
            + ": leave data.num_classes out (null) to take it from the file")
    if unused:
        log.warning("%s: no annotation uses %s: left out of the classes (%d classes: %s)", annotation_file, names,
                    len(used), ", ".join(cats[c] for c in sorted(used)))
    return len(used), sorted(used)


def prepare_data_config(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Check the paths of `splits` and fill `data.num_classes` / `data.category_ids` (in place).

    The synthetic data set (`data.synthetic`) is written on first use and has its classes in its
    config; only its cache folder is checked here.
    """
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    if data.get("synthetic") is not None:
        return
    if data.get("eval_split") == "train" and "val" in splits:
        splits = tuple(dict.fromkeys([s for s in splits if s != "val"] + ["train"]))
    paths = check_data_paths(data, splits)
    source = paths.get("train_annotations") or paths.get("val_annotations")
    if source is None:
        return
    num_classes, ids = resolve_classes(data, source)
    with open_dict(cfg):
        cfg.data.num_classes = num_classes
        cfg.data.category_ids = ids

