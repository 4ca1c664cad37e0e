"""Read an offline W&B run directory back (tests only).

wandb ≥ 0.19 keeps an offline run in one transaction log, ``run-<id>.wandb`` (no
``files/config.yaml``): a 7-byte header (``:W&B``, magic ``0xBEE1``, version), then LevelDB log
blocks of 32 KiB holding serialised ``wandb_internal_pb2.Record`` messages, each chunk behind a
7-byte header (CRC32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _nested_set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def read_offline_run(run_dir: str | Path) -> dict:
    """``{"run_id", "group", "project", "config", "history"}`` of an ``offline-run-*`` directory.

    ``config`` is the final config (wandb stores each key as ``{"value": v}``; unwrapped here);
    ``history`` the list of logged rows, each a ``{key: value}`` dict.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    run: dict = {"config": {}, "history": []}

    def apply(items) -> None:
        for item in items:
            keys = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
                value = value["value"]
            _nested_set(run["config"], keys, value)

    for raw in _records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=rec.run.run_id, group=rec.run.run_group, project=rec.run.project)
            apply(rec.run.config.update)
        elif kind == "config":
            apply(rec.config.update)
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in rec.history.item})
    return run
