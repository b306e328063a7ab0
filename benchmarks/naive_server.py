"""The naive peer for the service load benchmark: a plain FastAPI + diffusers server that
generates one request at a time, synchronously, batch 1 — the shape of the official Ray Serve
Stable Diffusion example. Same profile, weights, scheduler and steps as the service.

    python benchmarks/naive_server.py --port 8765 [--model tiny-sd15]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from avatar_engine.config import load_profiles  # noqa: E402
from avatar_engine.engine import load_pipeline  # noqa: E402
from avatar_engine.requests import size_for_aspect_ratio  # noqa: E402
from avatar_engine.runtime.optimize import resolve_dtype  # noqa: E402


class Body(BaseModel):
    prompt: str
    seed: int = 0
    steps: int | None = None


def build_app(model: str, device: str | None) -> FastAPI:
    profile = load_profiles()[model]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(profile, dev, resolve_dtype(profile, dev))
    width, height = size_for_aspect_ratio(profile.resolution, "1:1", profile.size_multiple)
    lock = threading.Lock()  # one generation at a time, like a single-replica batch-1 server
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/generate")
    def generate(body: Body):
        with lock:
            image = pipe(prompt=body.prompt, num_inference_steps=body.steps or profile.steps,
                         guidance_scale=profile.guidance_scale, height=height, width=width,
                         generator=torch.Generator("cpu").manual_seed(body.seed)).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    uvicorn.run(build_app(args.model, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
