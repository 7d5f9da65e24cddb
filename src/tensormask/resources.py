"""The folders shipped beside the code: `conf/` (the Hydra configs) and `sweeps/` (the paper's tables).

They live at the top level of the repository; a wheel carries them inside the package
(`tensormask/conf`, `tensormask/sweeps`, copied by setup.py), so both an editable install (the
checkout's folders) and a plain `pip install .` (the package's copies) find them, from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensormask.errors import UserError

PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str, env: str) -> Path:
    """`$env` if set, else `<package>/<name>` (an installed wheel), else `<repository>/<name>`."""
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser().resolve()
    candidates = (PACKAGE / name, PACKAGE.parents[1] / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError(f"no {name}/ folder in {' or '.join(map(str, candidates))}: reinstall tensormask "
                    f"(pip install .), or set {env} to the folder")


def config_dir() -> Path:
    """The Hydra configs: $TENSORMASK_CONFIG_DIR, else the package's `conf/`, else the checkout's."""
    return data_dir("conf", "TENSORMASK_CONFIG_DIR")


def sweeps_dir() -> Path:
    """The paper's tables: $TENSORMASK_SWEEPS, else the package's `sweeps/`, else the checkout's."""
    return data_dir("sweeps", "TENSORMASK_SWEEPS")
