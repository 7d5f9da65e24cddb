"""Shared pieces of the entry points: where the configs are, short errors, `--help`, the summary.

Every entry point's `main()` goes through `run_main`: a mistake the user can fix (a
`tensormask.errors.UserError`, an unknown key or group option, a value of the wrong type, a missing
required value) ends in a short message on stderr naming the culprit and the fix, and exit status 2;
`HYDRA_FULL_ERROR=1` shows the full traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tensormask import resources
from tensormask.errors import UserError, error_chain

USER_ERROR_EXIT = 2


def config_dir() -> str:
    """The `conf/` folder (`tensormask.resources.config_dir`), as Hydra takes it."""
    return str(resources.config_dir())


def command_overrides(cfg: DictConfig | None = None) -> list[str]:
    """The Hydra overrides of this run (the command line's `key=value`s), [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    if cfg is not None and "overrides" in cfg:
        return list(cfg.overrides)
    return []


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    from tensormask.evaluation import format_metrics

    return format_metrics({k: v for k, v in metrics.items() if isinstance(v, dict)})


def entry_command(name: str) -> str:
    """How to call the entry point `name` (eval, predict, ...) the way this process was called:
    `.venv/bin/tensormask-eval` beside `.venv/bin/tensormask-train`, else `python -m tensormask.<module>`."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if script.name.startswith("tensormask-"):
        return str(script.with_name(f"tensormask-{name}"))
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    return f"{python} -m tensormask.{ {'eval': 'evaluate'}.get(name, name)}"


_HYDRA_BARE = re.compile(r"[A-Za-z0-9_/.+\-]+")  # what Hydra's override grammar reads unquoted as that string
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_/.+\-=:,@%]+")


def override_arg(key: str, value: Any) -> str:
    """`key=value` as one shell argument that Hydra reads back as exactly `value` (a path with
    spaces, non-ASCII letters or quotes: quoted for Hydra, then for the shell), for the commands
    the entry points print to be pasted."""
    text = str(value)
    arg = f"{key}={text}" if _HYDRA_BARE.fullmatch(text) else f"{key}='" + text.replace("'", "\\'") + "'"
    if _SHELL_SAFE.fullmatch(arg):
        return arg
    if not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def link_latest(run_dir: str | Path, task_dir: str | Path) -> Path | None:
    """Point `<task_dir>/latest` at `run_dir` (a relative symlink, replaced atomically); returns it.
    `ckpt_path=outputs/train/latest` then names the newest training run."""
    run_dir, link = Path(run_dir), Path(task_dir) / "latest"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".latest.{os.getpid()}")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(run_dir.resolve(), link.parent.resolve()), target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: the run goes on without the link
        return None
    return link


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that do not apply here (each explained)."""
    import warnings

    # the run's config.yaml is written into the checkpoint folder before the first checkpoint
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # raised inside Lightning for torch >= 2.10, nothing to act on here
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's advertisements (litlogger, litmodels) and its TPU line: nothing about this run
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("💡 Tip:") or message.startswith("TPU available:"))


# ---------------------------------------------------------------------------------------------
# Short errors
# ---------------------------------------------------------------------------------------------

_OURS = "_TENSORMASK_HYDRA_FULL_ERROR"  # marks a HYDRA_FULL_ERROR=1 set by run_main, not by the user


def full_errors_wanted() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1), not run_main in a parent process."""
    if os.environ.get(_OURS) == "1":
        return False
    return os.environ.get("HYDRA_FULL_ERROR", "").strip().lower() in {"1", "true", "yes"}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}.{key}" if prefix else str(key)
            if full == "hydra":
                continue
            keys.append(full)
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                keys += _all_keys(child, full)
    return keys


def did_you_mean(word: str, candidates: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)


def _unknown_key_message(full_key: str, parent: Any) -> str:
    leaf = full_key.rsplit(".", 1)[-1]
    prefix = full_key[: -len(leaf)]
    near = []
    if isinstance(parent, DictConfig):
        near = [prefix + k for k in did_you_mean(leaf, [str(k) for k in parent.keys()])]
        root = parent._get_root()
        if not near:
            everything = _all_keys(root)
            near = [k for k in everything if k.rsplit(".", 1)[-1] == leaf][:3] or did_you_mean(full_key, everything)
    text = f"unknown config key '{full_key}'"
    if near:
        text += "; did you mean " + " or ".join(f"'{k}'" for k in near) + "?"
    else:
        text += f"; see the keys with: {Path(sys.argv[0]).name} --cfg job"
    return text


def error_text(err: BaseException) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker, whose message is the
    worker's whole traceback ("Caught X in DataLoader worker process 1. Original Traceback ..."),
    the original message at its end."""
    text = str(err)
    if "Original Traceback (most recent call last)" not in text:
        return text
    kind = type(err)
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind("\n" + name)
        if at >= 0:
            return text[at + 1 + len(name):].strip()
    return text


def user_error_message(err: BaseException) -> str | None:
    """The short message for a mistake the user can fix, None for anything else (a bug)."""
    from hydra.errors import (
        ConfigCompositionException, InstantiationException, MissingConfigException, OverrideParseException,
    )
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import (
        ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationToMissingValueError,
        MissingMandatoryValue, ValidationError,
    )

    chain = list(error_chain(err))
    for e in chain:
        if isinstance(e, UserError):
            return error_text(e)
    for e in chain:
        if type(e).__module__.startswith("wandb") and type(e).__name__ in ("UsageError", "AuthenticationError"):
            # W&B online without an API key (or a wrong one): wandb.init raises before any step is trained
            return (f"W&B: {str(e).strip()} (logger.wandb.mode=online needs an API key: `wandb login` or "
                    "WANDB_API_KEY; logger.wandb.mode=offline logs without one, `wandb sync` uploads later)")
    for e in chain:
        if isinstance(e, InstantiationException) and isinstance(e.__cause__, (ValueError, TypeError)):
            # a constructor refused its arguments: "Error in call to target 'X':\nValueError(...)\nfull_key: k"
            text = str(e)
            key = text.rsplit("full_key:", 1)[1].strip() if "full_key:" in text else ""
            target = text.split("'")[1] if "'" in text else "?"
            return f"{key + ': ' if key else ''}{target.rsplit('.', 1)[-1]}: {e.__cause__}"
        if isinstance(e, MisconfigurationException):  # Lightning's "you misconfigured the Trainer"
            return f"trainer: {e}"
    for e in chain:
        if isinstance(e, MissingConfigException):
            missing = str(e.missing_cfg_file or "")
            group, _, option = missing.rpartition("/")
            options = list(e.options or [])
            if options:
                near = did_you_mean(option, options)
                hint = f" did you mean {group}={near[0]}?" if near else ""
                return f"{group}={option}: no such option;{hint} options of {group}: {', '.join(options)}"
            return str(e).split("\nConfig search path")[0].strip()
        if isinstance(e, OverrideParseException):
            text = f"cannot parse the override: {str(e).strip()}"
            override = str(getattr(e, "override", "") or "")
            key, eq, value = override.partition("=")
            if eq and not _HYDRA_BARE.fullmatch(value) and "'" not in value:
                # e.g. a path with non-ASCII letters: Hydra reads it in quotes, inside the shell's
                text += f"\n  a value with characters other than letters, digits and _ / . + - is quoted: {key}=\"'{value}'\""
            return text
        if isinstance(e, (MissingMandatoryValue, InterpolationToMissingValueError)):
            # "Missing mandatory value: ckpt_path", also inside an interpolation (a run folder's name)
            key = str(e).rsplit("Missing mandatory value:", 1)[-1].split()[0] if "Missing mandatory value:" in str(
                e) else (getattr(e, "full_key", None) or "?")
            return f"{key} is required: add {key}=... to the command line"
    composing = any(isinstance(e, ConfigCompositionException) for e in chain)  # (later: a bug in the code)
    for e in chain if composing else ():
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(e):
            return _unknown_key_message(str(e.full_key), e.parent_node)
        if isinstance(e, ValidationError):
            key = getattr(e, "full_key", "") or "?"
            return f"{key}: {str(e).splitlines()[0]}"
        if isinstance(e, GrammarParseError):
            return f"cannot parse a config value: {str(e).splitlines()[0]}"
    if composing:  # e.g. "Could not override 'trainer'. No match in the defaults list."
        return str(next(e for e in chain if isinstance(e, ConfigCompositionException))).split(
            "\nConfig search path")[0].strip()
    return None


def _exit_with(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    print(f"{prog}: (HYDRA_FULL_ERROR=1 shows the traceback; {prog} --help lists the options)", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT) from None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def short_user_errors(prog: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[DictConfig], Any]]:
    """Decorates an entry point's task (under `@hydra.main`): a user's mistake raised while it runs
    ends the process with the short message (Hydra would print a traceback first)."""
    import functools

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except Exception as err:
                message = None if full_errors_wanted() or _multirun() else user_error_message(err)
                if message is None:  # a bug; or one job of a sweep, which fails alone (the sweeper records it)
                    raise
                _exit_with(prog, message)

        return run

    return decorate


def run_main(hydra_main: Callable[[], Any], prog: str, config_name: str, doc: str | None,
             argv: list[str] | None = None) -> None:
    """Run an entry point's `@hydra.main` function: `--help` prints its own help; a user's mistake
    ends in a short message and exit 2 (no traceback unless HYDRA_FULL_ERROR=1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text(prog, config_name, doc, [a for a in args if a not in ("--help", "-h")]))
        return
    full = full_errors_wanted()
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _OURS)}
    if not full:
        # Hydra then re-raises instead of printing its own traceback; the messages are made here
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_OURS] = "1"
    try:
        hydra_main()
    except Exception as err:
        message = None if full else user_error_message(err)
        if message is None:
            raise
        _exit_with(prog, message)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------


def _group_options(conf: Path, group: str) -> list[str]:
    folder = conf / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def help_text(prog: str, config_name: str, doc: str | None, overrides: list[str] = ()) -> str:
    """The entry point's docstring (what it does, examples), then its own config groups with their
    options (the chosen one marked) and its top-level keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import tensormask.framework  # noqa: F401  (config resolvers)

    conf = Path(config_dir())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        except Exception:  # noqa: BLE001 - help still works with a broken override
            cfg = compose(config_name=config_name, return_hydra_config=True)
    GlobalHydra.instance().clear()
    choices = dict(cfg.hydra.runtime.choices)
    lines = [(doc or prog).strip(), "", f"usage: {prog} [group=option ...] [key=value ...]", "",
             "config groups (* = the current choice; `group=null` removes an optional one):"]
    groups = sorted(g for g in choices if g != "hydra" and not g.startswith("hydra/") and g != "local")
    if config_name == "train":
        groups.append("hydra/launcher")  # sweeps: tensormask-train -m ... hydra/launcher=slurm
    width = max(len(g) for g in groups) + 2
    for group in groups:
        chosen = choices.get(group)
        options = [f"{o}*" if o == chosen else o for o in _group_options(conf, group)]
        if chosen is None:
            options.append("null*")
        lines.append(f"  {group:<{width}}{' '.join(options)}")
    keys = [k for k in cfg.keys() if k != "hydra" and k not in choices  # values and lists (example_size, tags)
            and not OmegaConf.is_dict(cfg._get_node(k))]
    if keys:
        lines += ["", "top-level keys: " + ", ".join(str(k) for k in keys)]
    lines += ["", f"Every key of the config can be set (key=value); print the whole config with `{prog} --cfg job`.",
              f"Hydra's own options: `{prog} --hydra-help`. Tracebacks of errors: HYDRA_FULL_ERROR=1."]
    return "\n".join(lines)
