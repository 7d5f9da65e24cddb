"""OmegaConf resolvers the configs use (registered on import of `tensormask.framework`)."""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def run_name(override_dirname: str = "", default: str = "default") -> str:
    """A run folder name from the command line's overrides, so that the same command finds the
    same folder again (what `ckpt_path=last` relies on). Empty -> `default`; unsafe characters are
    replaced and long names shortened with a hash to stay a valid file name."""
    name = str(override_dirname or "").strip()
    if not name:
        return default
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)
    if len(name) > 120:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:100]}-{digest}"
    return name


def _register() -> None:
    if not OmegaConf.has_resolver("tm.run_name"):
        OmegaConf.register_new_resolver("tm.run_name", run_name)


_register()
