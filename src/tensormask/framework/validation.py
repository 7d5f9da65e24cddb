"""Config checks before any work: a wrong value is reported with its key and what is allowed.

What is checked where:
- Types come from the code: every config node with a `_target_` is checked against the signature
  of what it builds (Lightning's `Trainer`, `TensorMask`, the data module, ...): a key the target
  does not take is reported with a did-you-mean, a value of the wrong type with the type (e.g.
  `trainer.precision` lists Lightning's own precision names). A renamed parameter therefore shows
  up as an unknown key, never as a key nobody checks.
- Ranges the constructors do not check themselves are declared in `ARG_RULES`, per target and
  parameter name; a rule naming a parameter its target does not have (renamed) raises.
- `cross_key_problems`: the checks that involve several keys, which no single constructor can make.
- `check_environment`: what the machine must have for the config (a GPU for trainer=gpu).
Everything else (choices such as the mask head's interpolation or the backbone's depth) is
checked by the constructors, whose errors the entry points also print as short messages.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


_MISSING = object()
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


# ---------------------------------------------------------------------------------------------
# Value checks (each returns None when fine, else what is allowed)
# ---------------------------------------------------------------------------------------------


def _range_text(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    return f" <= {hi}" if hi is not None else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int | None = None, hi: int | None = None, none_ok: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None and none_ok:
            return None
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            return "must be an integer" + _range_text(lo, hi) + (" or null" if none_ok else "")
        return None

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           none_ok: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None and none_ok:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            return "must be a number" + _range_text(lo, hi, lo_open) + (" or null" if none_ok else "")
        return None

    return check


def _choice(*allowed: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(map(str, allowed))

    return check


def _int_list(lo: int = 0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        values = [v] if _is_int(v) else v
        if not isinstance(values, (list, tuple)) or not values or not all(_is_int(x) and x >= lo for x in values):
            return f"must be an integer or a non-empty list of integers >= {lo}"
        return None

    return check


def _steps(v: Any) -> str | None:
    if isinstance(v, (list, tuple)) and all(_is_int(m) and m >= 0 for m in v):
        return None
    return "must be a list of step numbers >= 0"


# Ranges the constructors leave unchecked (or check too late: the evaluator is a partial built
# after training), per target and parameter; a dotted name checks inside a dict parameter.
ARG_RULES: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "tensormask.modeling.TensorMask": {
        "num_classes": _int(1),
        "score_threshold": _float(0.0, 1.0),
        "nms_threshold": _float(0.0, 1.0),
        "mask_threshold": _float(0.0, 1.0),
        "max_detections": _int(1),
        "topk_candidates": _int(1),
    },
    "tensormask.modeling.baselines._Baseline": {"num_classes": _int(1)},
    "tensormask.modeling.ResNetFPN": {"out_channels": _int(1), "freeze_at": _int(0, 5)},
    "tensormask.framework.DetectionDataModule": {
        "num_classes": _int(1),
        "global_batch_size": _int(1),
        "eval_batch_size": _int(1),
        "num_workers": _int(0),
        "max_val_images": _int(1, none_ok=True),
        "train_transforms.min_size": _int_list(1),
        "train_transforms.max_size": _int(1),
        "train_transforms.flip_prob": _float(0.0, 1.0),
        "test_transforms.min_size": _int_list(1),
        "test_transforms.max_size": _int(1),
    },
    "tensormask.framework.DetectionLitModule": {
        "base_lr": _float(0.0, lo_open=True),
        "base_batch_size": _int(1),
        "milestones": _steps,
        "warmup_steps": _int(0),
        "warmup_factor": _float(0.0, 1.0),
        "gamma": _float(0.0, 1.0),
        "weight_decay": _float(0.0),
    },
    "tensormask.evaluation.COCOEvaluator": {"backend": _choice("pycocotools", "faster_coco_eval")},
    # training is one endless epoch that max_steps ends; evaluation runs every N steps
    "lightning.pytorch.Trainer": {
        "max_steps": _int(1),
        "num_nodes": _int(1),
        "gradient_clip_val": _float(0.0, lo_open=True, none_ok=True),
        "gradient_clip_algorithm": _choice("norm", "value", None),
        "accumulate_grad_batches": _int(1),
        "val_check_interval": _int(1, none_ok=True),
    },
    "lightning.pytorch.callbacks.ModelCheckpoint": {"every_n_train_steps": _int(1, none_ok=True)},
}

# The entry points' own top-level keys (per task_name): they build nothing, so they are typed here.
TOP_LEVEL: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "train": {"seed": _int(0, none_ok=True), "train": _choice(True, False), "evaluate": _choice(True, False),
              "allow_random_init": _choice(True, False)},
    "eval": {"seed": _int(0, none_ok=True), "per_category": _choice(True, False)},
}


# ---------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _target(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


@lru_cache(maxsize=None)
def _signature(obj: Any) -> inspect.Signature | None:
    """The parameters `obj` takes; a class whose __init__ only passes (*args, **kwargs) on to its
    base takes the base's."""
    for target in (obj.__mro__ if inspect.isclass(obj) else (obj,)):
        if target is object:
            break
        signature = None
        for kwargs in ({"eval_str": True}, {}):
            try:
                signature = inspect.signature(target, **kwargs)
                break
            except (TypeError, ValueError, NameError):
                continue
        if signature is None:
            return None
        named = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named or not inspect.isclass(obj):
            return signature
    return None


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a config value (plain containers) can be passed for `annotation`; unknown types pass."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object built from its own node
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (base is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(_accepts(v, item) for v in value)
    if base in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if base is collections.abc.Callable:
        return True
    if isinstance(base, type):
        return isinstance(value, (base, dict))
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is typing.Literal:
        return ", ".join(map(str, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if annotation in names:
        return names[annotation]
    base = origin or annotation
    if base in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _rules_for(obj: Any) -> dict[str, Callable[[Any], str | None]]:
    rules: dict[str, Callable[[Any], str | None]] = {}
    for path, table in ARG_RULES.items():
        owner = _target(path)
        if obj is owner or (inspect.isclass(obj) and inspect.isclass(owner) and issubclass(obj, owner)):
            rules.update(table)
    return rules


def check_rule_names() -> None:
    """Every rule names a parameter its target has (raises RuntimeError: a rule left behind by a rename)."""
    for path, table in ARG_RULES.items():
        params = _signature(_target(path)).parameters
        for name in table:
            if name.split(".")[0] not in params:
                raise RuntimeError(f"validation.ARG_RULES[{path!r}] checks {name!r}, which {path} does not take")


def _did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(word, options, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(near)}?" if near else ""


# null here means "filled at the start of the run": data=coco's classes come from the annotation
# file (tensormask.framework.data_config, docs/data.md "Your own data")
FILLED_AT_START = {"num_classes"}

# keys of a node that the builders consume instead of its constructor (framework/builders.py)
BUILDER_KEYS: dict[str, tuple[str, ...]] = {"tensormask.modeling.ResNetFPN": ("weights",)}


def _node_problems(node: DictConfig, key: str) -> list[str]:
    target_path = node.get("_target_")
    try:
        obj = _target(str(target_path))
    except Exception:  # noqa: BLE001 - reported as such
        return [f"{key}._target_={target_path!r}: no such class or function"]
    signature = _signature(obj)
    if signature is None:
        return []
    params = {n: p for n, p in signature.parameters.items() if n != "self"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    problems = []
    rules = _rules_for(obj)
    for name in rules:
        if name.split(".")[0] not in params:
            raise RuntimeError(f"validation.ARG_RULES: {target_path} takes no {name.split('.')[0]!r} (renamed?)")
    for name in node.keys():
        name = str(name)
        if name in _HYDRA_KEYS:
            continue
        full = f"{key}.{name}" if key else name
        if name in BUILDER_KEYS.get(str(target_path), ()):
            continue
        if name not in params:
            if not takes_any:
                problems.append(f"{full}: {target_path} takes no argument {name!r}"
                                f"{_did_you_mean(name, list(params))}")
            continue
        try:
            value = node[name]
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - a missing value (???), or an interpolation only the running app resolves
            continue
        if value is None and OmegaConf.is_interpolation(node, name):
            continue  # e.g. ${hydra:runtime.output_dir} in a config composed outside a running app
        if value is None and name in FILLED_AT_START:
            continue
        if not _accepts(value, params[name].annotation):
            problems.append(f"{full}={value!r}: must be {_describe(params[name].annotation)}")
            continue
        if name in rules and (message := rules[name](value)):
            problems.append(f"{full}={value!r}: {message}")
        for rule_name, check in rules.items():
            head, _, sub = rule_name.partition(".")
            if head == name and sub and isinstance(value, dict) and sub in value:
                if message := check(value[sub]):
                    problems.append(f"{full}.{sub}={value[sub]!r}: {message}")
    return problems


def _target_nodes(cfg: DictConfig, prefix: str = ""):
    for key in cfg.keys():
        if prefix == "" and key == "hydra":
            continue
        child = cfg._get_node(key)
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            if "_target_" in child:
                yield full, child
            yield from _target_nodes(child, full)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)


# ---------------------------------------------------------------------------------------------
# Cross-key checks and the machine
# ---------------------------------------------------------------------------------------------


def cross_key_problems(cfg: DictConfig) -> list[str]:
    """The checks that involve several keys (no constructor sees them together)."""
    problems = []
    batch, devices, nodes = (_get(cfg, k) for k in ("data.global_batch_size", "trainer.devices", "trainer.num_nodes"))
    if _is_int(batch) and _is_int(devices) and devices > 0:
        # the data module splits the global batch over the processes itself
        world = devices * (nodes if _is_int(nodes) and nodes > 0 else 1)
        if batch % world:
            problems.append(f"data.global_batch_size={batch}: must be divisible by the number of processes "
                            f"(trainer.devices x trainer.num_nodes = {world})")
    model_classes, data_classes = _get(cfg, "model.num_classes"), _get(cfg, "data.num_classes")
    if _is_int(model_classes) and _is_int(data_classes) and model_classes != data_classes:
        problems.append(f"model.num_classes={model_classes}: must equal data.num_classes={data_classes}")
    target = str(_get(cfg, "model._target_") or "")
    # the mode files set TensorMask's head keys, which a torchvision baseline does not take
    if "baselines" in target and any(_get(cfg, f"model.{k}") is not _MISSING for k in ("mask_head", "box_head")):
        problems.append("mode=box_only / mode=mask_only apply to TensorMask only; torchvision baselines take mode=full")
    return problems


def check_environment(cfg: DictConfig) -> None:
    """What this machine must have for the config: a CUDA GPU for trainer=gpu (accelerator gpu/cuda)."""
    accelerator = str(_get(cfg, "trainer.accelerator"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} (trainer=gpu/ddp): this machine has no usable CUDA "
                              "GPU (torch.cuda.is_available() is False); use trainer=cpu, or run on a GPU machine")
    if accelerator == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator=mps: no Apple GPU here; use trainer=cpu")


def validate_config(cfg: DictConfig) -> None:
    """Check the config before any work; raise ConfigError listing every problem found. (What the
    machine must have is `check_environment`'s: a config for a GPU cluster is valid on a laptop.)"""
    problems = []
    for key, check in TOP_LEVEL.get(str(_get(cfg, "task_name")), {}).items():
        value = _get(cfg, key)
        if value is _MISSING:
            raise RuntimeError(f"validation.TOP_LEVEL: the {cfg.task_name} config has no key {key!r} (renamed?)")
        if message := check(value):
            problems.append(f"{key}={value!r}: {message}")
    for key, node in _target_nodes(cfg):
        problems += _node_problems(node, key)
    problems += cross_key_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
