"""Identity fidelity in the published form (FaceSim, as in PuLID's Table 1 on DivID-120).

Runs reference identities × prompts through percify (and pairs of identities through cast), then
scores every output face against the person's reference photos with the engine's face *scorer*
(dlib's ResNet descriptor by default — a different face model from the one that conditions
generation, as the published protocol requires). Prints one table row per model × identity
method (every method the model offers: faceid, faceid-plus-v2, instantid; `--methods` picks) ×
identity strength (× task):

- FaceSim: mean ± standard deviation of the cosine similarity between the reference photos'
  descriptor and the largest face in each output (outputs without a detected face excluded);
- same: share of ALL outputs the scorer judges the same person (its calibrated verdict);
- faces: face-detection rate in the outputs;
- CLIP-T: 100 × cosine(CLIP image, CLIP prompt) where a CLIP model is available offline
  (`--clip`, a local folder or a cached hub id), else "n/a".

    python benchmarks/identity_fidelity.py        # tiny-sd15 (faceid, faceid-plus-v2), tiny-sdxl (faceid, instantid):
                                                  # the harness alive; numbers meaningless on random weights
    python benchmarks/identity_fidelity.py --identities ~/people --models sd15 --device cuda \\
        --strengths 0,0.5,0.8,1.0 --clip openai/clip-vit-large-patch14

`--identities DIR` holds one subfolder per person with 1..5 photos each (jpg/png/webp); without it
the bundled real photos are used (scikit-image's astronaut and the six people of insightface's
t1.jpg, one photo each). Absolute FaceSim depends on the scorer: the published numbers below use
CurricularFace, this benchmark's scorer is named in the output; compare methods within one run.

Published (PuLID paper, Table 1, DivID-120; FaceSim / CLIP-T): PhotoMaker 0.271 / 26.1,
IP-Adapter FaceID 0.619 / 28.4, InstantID 0.725 / 28.7, PuLID 0.733 / 31.3.

Last line: {"scorer": ..., "rows": [{"model", "method", "strength", "task", "images", "faceSim",
"faceSimStd", "sameRate", "faceRate", "clipT", "seconds"}, ...]}
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env  # noqa: E402,F401 - sets up imports and the offline environment

import numpy as np  # noqa: E402

PUBLISHED = [("PhotoMaker", 0.271, 26.1), ("IP-Adapter FaceID", 0.619, 28.4), ("InstantID", 0.725, 28.7),
             ("PuLID", 0.733, 31.3)]
PROMPTS = ["a portrait photo of a person", "a person as an astronaut on the moon, cinematic",
           "a person as a medieval knight, oil painting", "a person reading in a cafe, candid photo"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


# ---- inputs ---------------------------------------------------------------------------------------

def load_identities(folder: str | None, max_photos: int = 5) -> dict[str, list[bytes]]:
    """{person: [photo bytes]} from one subfolder per person, or the bundled real photos."""
    if folder:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise SystemExit(f"--identities {folder}: not a folder")
        people = {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTS)[:max_photos]
            if files:
                people[sub.name] = [f.read_bytes() for f in files]
        if not people:
            raise SystemExit(f"--identities {folder}: no subfolder with {'/'.join(IMAGE_EXTS)} photos")
        return people
    try:
        from percify_workload import reference_photos

        photos = reference_photos()
        return {"astronaut": [photos[0]], **{f"t1-person{i + 1}": [p] for i, p in enumerate(photos[1:])}}
    except ImportError:  # insightface (which ships t1.jpg) not installed: the astronaut alone
        import skimage.data
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(skimage.data.astronaut()).save(buf, format="JPEG", quality=92)
        return {"astronaut": [buf.getvalue()]}


def methods_for(profile, only: list[str] | None = None) -> list[tuple[str, dict]]:
    """The identity methods a profile offers (models.yaml `identity_methods`, the default first),
    as (name, extra request kwargs), optionally restricted to `only`."""
    offered = list(getattr(profile, "offered_identity_methods", ()) or ())
    if not offered and getattr(profile, "ip_adapter", None) is not None:
        offered = [profile.ip_adapter.variant]
    return [(m, {"identity_method": m}) for m in offered if not only or m in only]


class ClipScorer:
    """CLIP-T = 100 × cosine(image, text) with a locally available CLIP model, or unavailable."""

    def __init__(self, name: str | None, device: str = "cpu"):
        self.reason = None
        self.model = None
        if not name or name.lower() == "none":
            self.reason = "no CLIP model given (--clip)"
            return
        try:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
            self.device = device
        except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
            self.model = None
            self.reason = f"CLIP model {name!r} not available offline ({type(exc).__name__})"

    def score(self, image, text: str) -> float | None:
        if self.model is None:
            return None
        import torch

        with torch.inference_mode():
            inp = self.processor(text=[text], images=[image], return_tensors="pt", padding=True, truncation=True)
            inp = {k: v.to(self.device) for k, v in inp.items()}
            out = self.model(**inp)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            return float(100.0 * (img * txt).sum())


# ---- runs -------------------------------------------------------------------------------------------

def _summary(sims: list, same: list, faces: list, clips: list) -> dict:
    got = [s for s in sims if s is not None]
    n = len(faces)
    clip = [c for c in clips if c is not None]
    return {"images": n,
            "faceSim": round(float(np.mean(got)), 4) if got else None,
            "faceSimStd": round(float(np.std(got)), 4) if got else None,
            "sameRate": round(sum(1 for s in same if s) / n, 4) if n else None,
            "faceRate": round(sum(1 for f in faces if f) / n, 4) if n else None,
            "clipT": round(float(np.mean(clip)), 2) if clip else None}


def run_percify(engine, model: str, method_kwargs: dict, strength: float, people: dict, prompts: list,
                args, clip: ClipScorer) -> dict:
    from avatar_engine.requests import PercifyRequest

    sims, same, faces, clips, skipped = [], [], [], [], []
    requests, meta = [], []
    for name, photos in people.items():
        for j, prompt in enumerate(prompts):
            requests.append(PercifyRequest(prompt=prompt, photos=photos, identity_strength=strength, model=model,
                                           steps=args.steps, seed=args.seed + j, batch_size=args.images_per_prompt,
                                           mismatched_photos="drop", **method_kwargs))
            meta.append((name, prompt))
    try:
        results = engine.generate(requests)  # one engine call: the engine packs them into batches
    except Exception:  # noqa: BLE001 - one bad photo folder: run one by one to name it and go on
        results = []
        for (name, _), req in zip(meta, requests):
            try:
                results.append(engine.generate(req))
            except Exception as exc:  # noqa: BLE001
                skipped.append(f"{name}: {type(exc).__name__}: {getattr(exc, 'message', exc)}")
                results.append(None)
    for (name, prompt), res in zip(meta, results):
        if res is None:
            continue
        ident = res.report.to_json()["identity"]
        sims += ident["similarity"]
        same += [bool(s) for s in ident["sameIdentity"]]
        faces += [bool(n) for n in ident["outputFaces"]]
        clips += [clip.score(img, prompt) for img in res.images]
    out = _summary(sims, same, faces, clips)
    if skipped:
        out["skipped"] = sorted(set(skipped))
    return out


def run_cast(engine, model: str, strength: float, people: dict, prompts: list, pairs: int, args,
             clip: ClipScorer, method_kwargs: dict) -> dict:
    from avatar_engine.requests import CastCharacter, CastRequest

    names = list(people)
    sims, same, faces, clips, skipped = [], [], [], [], []
    for p in range(min(pairs, len(names) // 2)):
        a, b = names[2 * p], names[2 * p + 1]
        for j, prompt in enumerate(prompts):
            scene = f"two people side by side, {prompt.replace('a person', 'friends')}"
            req = CastRequest(prompt=scene, characters=[CastCharacter("a person", photos=people[a]),
                                                        CastCharacter("a person", photos=people[b])],
                              identity_strength=strength, model=model, steps=args.steps, seed=args.seed + j,
                              batch_size=args.images_per_prompt, aspect_ratio="16:9", **method_kwargs)
            try:
                res = engine.generate(req)
            except Exception as exc:  # noqa: BLE001 - e.g. a method cast cannot use: say so, go on
                skipped.append(f"{a}+{b}: {type(exc).__name__}: {getattr(exc, 'message', exc)}")
                continue
            for c in res.report.to_json()["characters"]:
                for m in c["images"]:
                    sims.append(m["similarity"])
                    same.append(bool(m["sameIdentity"]))
                    faces.append(m["faceBox"] is not None)
            clips += [clip.score(img, scene) for img in res.images]
    out = _summary(sims, same, faces, clips)
    if skipped:
        out["skipped"] = sorted(set(skipped))
    return out


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(rows: list[dict], scorer: dict, clip_note: str | None) -> None:
    out = sys.stderr
    print(f"\nIdentity fidelity — scorer: {scorer['name']} ({scorer['label']}); "
          f"FaceSim = cosine of its descriptors; same = {scorer['verdict']}", file=out)
    if scorer.get("fallback"):
        print("WARNING: the fallback scorer is not a face-recognition model; these numbers are not identity "
              "fidelity", file=out)
    head = f"{'model':<14} {'method':<14} {'task':<8} {'strength':>8} {'images':>6} {'FaceSim':>8} {'± std':>7} " \
           f"{'same':>6} {'faces':>6} {'CLIP-T':>7} {'time':>7}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r['model']:<14} {r['method']:<14} {r['task']:<8} {r['strength']:>8.2f} {r['images']:>6} "
              f"{_fmt(r['faceSim'], '.3f'):>8} {_fmt(r['faceSimStd'], '.3f'):>7} {_fmt(r['sameRate'], '.0%'):>6} "
              f"{_fmt(r['faceRate'], '.0%'):>6} {_fmt(r['clipT'], '.1f'):>7} {r['seconds']:>6.1f}s", file=out)
        for s in r.get("skipped", []):
            print(f"    skipped {s}", file=out)
    if clip_note:
        print(f"CLIP-T n/a: {clip_note}", file=out)
    print("\nPublished (PuLID paper, Table 1, DivID-120; FaceSim by CurricularFace, not comparable in absolute "
          "terms with another scorer):", file=out)
    for name, sim, clip_t in PUBLISHED:
        print(f"  {name:<18} FaceSim {sim:.3f}   CLIP-T {clip_t:.1f}", file=out)


def main(argv=None, engine=None) -> dict:
    """argv: the command line; engine: an existing AvatarEngine to use (tests), else one is built
    from the flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", default=None, help="folder with one subfolder of photos per person")
    ap.add_argument("--max-identities", type=int, default=None)
    ap.add_argument("--models", default="tiny-sd15,tiny-sdxl",
                    help="comma-separated profile names; each runs every identity method it offers")
    ap.add_argument("--methods", default=None,
                    help="comma-separated identity methods to run (faceid, faceid-plus-v2, instantid); default: all "
                         "a model offers")
    ap.add_argument("--strengths", default="0,0.8", help="comma-separated identity strengths (0 = no identity)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--prompts-file", default=None, help="one prompt per line (replaces the built-in prompts)")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--cast-pairs", type=int, default=2, help="identity pairs run through cast (0: none)")
    ap.add_argument("--steps", type=int, default=None, help="default: the profile's")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--device", default=None)
    ap.add_argument("--face-backend", default="embedded", choices=("embedded", "insightface"))
    ap.add_argument("--face-model-root", default=None)
    ap.add_argument("--face-scorer", default="auto", choices=("auto", "dlib", "arcface", "handcrafted"))
    ap.add_argument("--clip", default="openai/clip-vit-large-patch14",
                    help="CLIP model (local folder or cached hub id) for CLIP-T; 'none' to skip")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from avatar_engine import AvatarEngine, EngineConfig
    from avatar_engine.tasks import face_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    people = load_identities(args.identities)
    if args.max_identities:
        people = dict(list(people.items())[: args.max_identities])
    prompts = PROMPTS[: max(1, args.prompts)]
    if args.prompts_file:
        prompts = [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    if engine is None:
        engine = AvatarEngine(EngineConfig(device=args.device, face_backend=args.face_backend,
                                           face_model_root=args.face_model_root, face_scorer=args.face_scorer))
    scorer = face_scorer(engine)
    clip = ClipScorer(args.clip, "cuda" if engine.device.type == "cuda" else "cpu")
    print(f"{len(people)} identities × {len(prompts)} prompts × {args.images_per_prompt} image(s); "
          f"strengths {strengths}; device {engine.device}", file=sys.stderr)

    rows = []
    t0 = time.perf_counter()
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        profile = engine.profile(model)
        only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        methods = methods_for(profile, only)
        if not methods:
            print(f"{model}: none of the identity methods asked for is offered; skipped", file=sys.stderr)
            continue
        for method, kwargs in methods:
            for strength in strengths:
                t = time.perf_counter()
                r = run_percify(engine, model, kwargs, strength, people, prompts, args, clip)
                rows.append({"model": model, "method": method, "task": "percify", "strength": strength, **r,
                             "seconds": round(time.perf_counter() - t, 2)})
                if args.cast_pairs > 0 and len(people) >= 2:
                    t = time.perf_counter()
                    c = run_cast(engine, model, strength, people, prompts, args.cast_pairs, args, clip, kwargs)
                    rows.append({"model": model, "method": method, "task": "cast", "strength": strength, **c,
                                 "seconds": round(time.perf_counter() - t, 2)})
    print_table(rows, scorer.info(), clip.reason)
    print(f"wall time {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    result = {"scorer": scorer.name, "identities": len(people), "prompts": len(prompts), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
