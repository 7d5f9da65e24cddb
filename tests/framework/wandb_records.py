"""Read what an offline W&B run logged, from its own files (no account, no network).

wandb (0.31) keeps an offline run in one log `run-<id>.wandb` that `wandb sync` uploads: a
LevelDB-style log (7-byte file header, 32 KiB blocks, each chunk a 7-byte header: crc32, length,
type full/first/middle/last) of `wandb.proto.wandb_internal_pb2.Record`s. Media (images, masks,
box lists, tables) are files under `files/` that the records point to.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(log: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(log).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{log}: not a W&B run log")
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
        else:
            break
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


class OfflineRun:
    """history: {key: [row values...]} with nested keys joined by "/" and values decoded from JSON;
    config: the run's config updates (nested keys joined by "/")."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        (log,) = self.folder.glob("run-*.wandb")
        self.history: dict[str, list[Any]] = {}
        self.config: dict[str, Any] = {}
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    self.history.setdefault(key, []).append(json.loads(item.value_json))
            elif kind == "config":
                for item in record.config.update:
                    key = item.key or "/".join(item.nested_key)
                    self.config[key] = json.loads(item.value_json)

    def last(self, key: str) -> Any:
        return self.history[key][-1]

    def file(self, relative: str) -> Path:
        return self.folder / "files" / relative

    def json_file(self, relative: str) -> Any:
        return json.loads(self.file(relative).read_text())


def wait_for(folder: Path, keys: tuple[str, ...], timeout: float = 60.0) -> OfflineRun:
    """The offline run once its history holds `keys`: wandb-core writes the log from its own process
    and may still be flushing after `wandb.finish()` returns on a loaded machine (bounded wait)."""
    import time

    deadline = time.monotonic() + timeout
    run = OfflineRun(folder)
    while not all(k in run.history for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
        run = OfflineRun(folder)
    return run
