"""Batch generation for library users: a JSONL file of requests → PNGs + sidecars.

Resumable: a request whose sidecar exists is skipped, so re-running after an interruption
only does what is left. Requests are fed to the engine in chunks so they batch together.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import RequestValidationError
from .io import is_complete, save_result
from .protocol import request_from_dict
from .requests import GenerationRequest


@dataclass
class BatchSummary:
    total: int
    generated: int
    skipped: int


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, GenerationRequest]]:
    """(id, request) per non-empty line. `id` defaults to a hash of the line so a resumed run
    matches the same request even without explicit ids. Errors name the line and field."""
    entries, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if isinstance(data, str):
                    data = {"prompt": data}
                req = request_from_dict(data, extra_fields=("id",))
            except json.JSONDecodeError as exc:
                raise RequestValidationError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            except RequestValidationError as exc:
                raise RequestValidationError(f"{path}:{lineno}: {exc.message}", param=exc.param) from exc
            rid = str(data.get("id") or hashlib.sha256(line.strip().encode()).hexdigest()[:16])
            if not rid.replace("-", "").replace("_", "").isalnum():
                raise RequestValidationError(f"{path}:{lineno}: id may only hold letters, digits, - and _", param="id")
            if rid in seen:
                raise RequestValidationError(f"{path}:{lineno}: duplicate id {rid!r}", param="id")
            seen.add(rid)
            entries.append((rid, req))
    return entries


def run_batch(engine, entries: Iterable[tuple[str, GenerationRequest]], out_dir: str | os.PathLike,
              chunk_size: int = 16, show_progress: bool = True) -> BatchSummary:
    """Generate every entry not already complete in `out_dir`."""
    from tqdm import tqdm  # progress bar: only for batch runs

    entries = list(entries)
    todo = [(rid, req) for rid, req in entries if not is_complete(out_dir, rid)]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="req", disable=not show_progress, desc="avatar-engine batch")
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        for (rid, _), result in zip(chunk, engine.generate([req for _, req in chunk])):
            save_result(result, out_dir, rid)
            bar.update(1)
    bar.close()
    return BatchSummary(total=len(entries), generated=len(todo), skipped=len(entries) - len(todo))


def generate_batch(engine, jsonl_path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> BatchSummary:
    return run_batch(engine, read_jsonl(jsonl_path), out_dir, **kwargs)
