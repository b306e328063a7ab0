"""Writing results to disk: PNGs plus a JSON sidecar, atomically (tmp + rename) so an
interrupted run never leaves a half-written file that a resumed run would trust."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .protocol import request_to_wire, result_to_wire
from .provenance.marking import default_marker
from .requests import GenerationResult


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(fh)` into a temporary file beside it, then rename: readers see
    the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_dir_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build a directory with `build(tmp)` in a temporary directory beside `target`, then rename it
    into place: concurrent processes never read half a directory, and when two race, the loser's
    identical copy is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_result(result: GenerationResult, out_dir: str | os.PathLike, stem: str, *, mark: bool = True) -> list[Path]:
    """Write `{stem}_{i}.png` for every image, then `{stem}.json` (written last: its presence
    means the result is complete). `mark`: each PNG carries an invisible watermark for avatar id
    `{stem}_{i}` and signed Content Credentials (the embedded local signer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    marker = default_marker() if mark else None
    for i, image in enumerate(result.images):
        p = out / f"{stem}_{i}.png"
        if marker is None:
            atomic_write(p, lambda fh, im=image: im.save(fh, format="PNG"))
        else:
            data = marker.mark(image, avatar_id=p.stem, claims=marker.claims(
                model_profile=result.model, identity_method=getattr(result.request, "identity_method", None),
                request_params={"kind": result.request.kind, **request_to_wire(result.request)}, avatar_id=p.stem))
            atomic_write(p, lambda fh, b=data: fh.write(b))
        paths.append(p)
    meta = result_to_wire(result)
    meta["files"] = [p.name for p in paths]
    if marker is not None:
        meta["provenance"] = {"watermark": marker.config.watermark, "contentCredentials": True,
                              "trustedSigner": marker.trusted_signer}
    atomic_write(out / f"{stem}.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return paths


def is_complete(out_dir: str | os.PathLike, stem: str) -> bool:
    return (Path(out_dir) / f"{stem}.json").exists()
