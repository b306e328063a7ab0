"""Cast (several people in one image): regional prompting + masked identities in one pass.

Invariants on the tiny models, not looks: a character whose region is empty changes nothing;
one character's prompt/identity changes an attention layer only inside its region; identical
region prompts reproduce plain generation; batching, determinism, validation naming the
character and field; the identity report's one-to-one matching on real photos."""
from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_engine import GenerationRequest, GenerationResult
from avatar_engine.protocol import request_from_dict, result_to_wire
from avatar_engine.requests import MAX_BOX_OVERLAP, CastCharacter, CastRequest
from avatar_engine.tasks.cast import identity_report
from avatar_engine.tasks.identity import match_faces
from avatar_engine.errors import ImageError, NoFaceError, RequestValidationError
from avatar_engine.faces.scoring import FaceScorer, ScoredFace
from avatar_engine.model.attention import (MAX_CHARACTERS, REGIONAL_PROMPTS, AvatarAttnProcessor, CallConditioning,
                                     IdentityWeights)
from avatar_engine.model.regional import region_masks, regional_conditioning
from avatar_engine.requests.layout import auto_layout
from face_support import require_dlib

torch.set_num_threads(2)


def cast_from_dict(data: dict) -> CastRequest:
    return request_from_dict(data, CastRequest)
skimage_data = pytest.importorskip("skimage.data")

RNG = np.random.default_rng(1234)
EMB = [RNG.standard_normal(512).astype(np.float32) for _ in range(4)]
STEPS = 8


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cast(n=2, **kw) -> CastRequest:
    prompts = ["a woman in a red suit", "a man in a blue suit", "a robot", "a dog"]
    chars = kw.pop("characters", None) or [CastCharacter(p) for p in prompts[:n]]
    kw.setdefault("seed", 11)
    kw.setdefault("steps", STEPS)
    return CastRequest(prompt="astronauts on mars", characters=chars, **kw)


def render(engine, request: CastRequest, edit=None):
    """Run the cast task directly, optionally editing its plan first (e.g. emptying a region)."""
    task = engine._tasks["cast"]
    r = engine.resolve(request)
    model = engine.load(r.model)
    plan = task.prepare(model, r)
    if edit:
        edit(plan)
    with torch.inference_mode():
        return task.run(model, [r], task.items(model, r, 0, plan), None)[0]


def empty_region(i):
    def edit(plan):
        plan.masks = plan.masks.clone()
        plan.masks[i] = 0.0
    return edit


# ---- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("size,expect", [((64, 64), "columns"), ((80, 48), "columns"), ((48, 80), None)])
def test_auto_layout_is_aspect_aware(n, size, expect):
    w, h = size
    boxes = auto_layout(n, w, h)
    mode = expect or ("rows" if n >= 3 else "columns")
    assert len(boxes) == n
    for x0, y0, x1, y1 in boxes:
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    axis = 0 if mode == "columns" else 1
    starts = [b[axis] for b in boxes]
    assert starts == sorted(starts)
    assert all(a[axis + 2] < b[axis] for a, b in zip(boxes, boxes[1:]))  # gaps, no overlap
    assert boxes[0][axis] > 0.0 and boxes[-1][axis + 2] < 1.0  # margins


def test_request_layout_resolves_with_the_frame(tiny_engine):
    portrait = tiny_engine.resolve(cast(4, aspect_ratio="9:16"))
    assert portrait.region_boxes()[0] == "rows"
    assert tiny_engine.resolve(cast(2, aspect_ratio="9:16")).region_boxes()[0] == "columns"
    assert tiny_engine.resolve(cast(4, aspect_ratio="16:9")).region_boxes()[0] == "columns"
    assert tiny_engine.resolve(cast(3, layout="rows")).region_boxes()[0] == "rows"


def _padded(masks: torch.Tensor) -> torch.Tensor:
    """[K, H, W] → [1, MAX_CHARACTERS, H, W] (unused slots all zero), as the cast task pads."""
    extra = masks.new_zeros(MAX_CHARACTERS - masks.shape[0], *masks.shape[1:])
    return torch.cat([masks, extra])[None]


def test_region_weights_partition_every_pixel():
    """Background + characters sum to 1 at every UNet level, overlaps split evenly; identity
    masks follow the region weights and are zero for characters without a face."""
    boxes = [(0.0, 0.0, 0.6, 1.0), (0.5, 0.0, 1.0, 1.0)]
    masks = region_masks(boxes, 64, 64)
    assert (masks[:, :, 35] == 0.5).all() and (masks[0, :, 10] == 1).all() and (masks[1, :, 10] == 0).all()
    has_face = torch.tensor([[True, False, False, False]])
    values = regional_conditioning(_padded(masks), has_face, (8, 8), 4, "cpu", torch.float32)
    assert [w.shape for w in values["region_weights"]] == [(1, REGIONAL_PROMPTS, seq, 1) for seq in (64, 16, 4, 1)]
    for w, f in zip(values["region_weights"], values["face_masks"]):
        assert torch.allclose(w.sum(1), torch.ones(1, w.shape[2], 1), atol=1e-6) and (w >= 0).all()
        assert torch.equal(f[:, 0], w[:, 1]) and (f[:, 1:] == 0).all()
    level0 = values["region_weights"][0][0, :, :, 0].reshape(REGIONAL_PROMPTS, 8, 8)
    assert (level0[1, :, :4] == 1).all() and (level0[1, :, 5:] == 0).all()  # character 0: the left 60 %
    assert (level0[3:] == 0).all()  # unused slots


# ---- validation -----------------------------------------------------------------------------

def _photo():
    return png_bytes(Image.new("RGB", (64, 64), "white"))


INVALID = [
    (dict(characters=[CastCharacter("a")]), "characters"),
    (dict(characters=[CastCharacter(str(i)) for i in range(5)]), "characters"),
    (dict(characters=[CastCharacter("a"), "a man"]), "characters[1]"),
    (dict(characters=[CastCharacter("a"), CastCharacter("  ")]), "characters[1].prompt"),
    (dict(characters=[CastCharacter("a"), CastCharacter("b"), CastCharacter("c", photos=[_photo()] * 6)]),
     "characters[2].photos"),
    (dict(characters=[CastCharacter("a", photos=[_photo(), "a.jpg"]), CastCharacter("b")]), "characters[0].photos[1]"),
    (dict(characters=[CastCharacter("a", identity_embedding=[1.0] * 3), CastCharacter("b")]),
     "characters[0].identityEmbedding"),
    (dict(characters=[CastCharacter("a"), CastCharacter("b", identity_embedding=np.zeros(512))]),
     "characters[1].identityEmbedding"),
    (dict(characters=[CastCharacter("a", photos=[_photo()], identity_embedding=EMB[0]), CastCharacter("b")]),
     "characters[0].identityEmbedding"),
    (dict(characters=[CastCharacter("a", box=[0, 0, 0.5, 1]), CastCharacter("b", box=[0.5, 0, 1.2, 1])]),
     "characters[1].box"),
    (dict(characters=[CastCharacter("a", box=[0.5, 0, 0.5, 1]), CastCharacter("b", box=[0.5, 0, 1, 1])]),
     "characters[0].box"),
    (dict(characters=[CastCharacter("a", box=[0, 0, 0.05, 1]), CastCharacter("b", box=[0.5, 0, 1, 1])]),
     "characters[0].box"),
    (dict(characters=[CastCharacter("a", box=[0, 0, 0.5]), CastCharacter("b", box=[0.5, 0, 1, 1])]),
     "characters[0].box"),
    (dict(characters=[CastCharacter("a", box=[0, 0, 0.6, 1]), CastCharacter("b", box=[0.3, 0, 1, 1])]),
     "characters[1].box"),
    (dict(characters=[CastCharacter("a", box=[0, 0, 0.3, 1]), CastCharacter("b", box=[0.35, 0, 0.65, 1]),
                      CastCharacter("c")]), "characters[2].box"),
    (dict(layout="diagonal"), "layout"),
    (dict(layout="custom"), "layout"),
    (dict(layout="rows", characters=[CastCharacter("a", box=[0, 0, .5, 1]), CastCharacter("b", box=[.5, 0, 1, 1])]),
     "layout"),
    (dict(identity_strength=2.5), "identityStrength"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("kwargs,param", INVALID, ids=[p for _, p in INVALID])
def test_validation_errors_name_character_and_field(tiny_engine, kwargs, param):
    with pytest.raises(RequestValidationError) as e:
        tiny_engine.generate(cast(**kwargs))
    assert e.value.param == param
    assert param.split(".")[0] in e.value.message  # the message names the character too


def test_overlap_below_the_limit_is_allowed():
    from avatar_engine.requests.layout import box_overlap

    d = 0.5 * MAX_BOX_OVERLAP * 0.8  # overlap of 80 % of the limit
    req = cast(characters=[CastCharacter("a", box=[0, 0, 0.5 + d, 1]), CastCharacter("b", box=[0.5, 0, 1, 1])])
    req.validate()  # raises RequestValidationError above the limit (test_validation_errors_name_...)
    layout, boxes = req.region_boxes()
    assert layout == "custom" and 0 < box_overlap(boxes[0], boxes[1]) < MAX_BOX_OVERLAP


def test_no_face_and_bad_image_name_the_character_photo(tiny_engine, astronaut):
    coffee = png_bytes(Image.fromarray(skimage_data.coffee()))
    chars = [CastCharacter("a", photos=[png_bytes(astronaut)]),
             CastCharacter("b", photos=[png_bytes(astronaut), coffee])]
    with pytest.raises(NoFaceError) as e:
        tiny_engine.generate(cast(characters=chars))
    assert e.value.param == "characters[1].photos[1]"
    chars = [CastCharacter("a", photos=[b"GIF89a not allowed"]), CastCharacter("b")]
    with pytest.raises(ImageError) as e:
        tiny_engine.generate(cast(characters=chars))
    assert e.value.param == "characters[0].photos[0]"


def test_wire_format_parses_and_rejects_unknown_fields():
    req = cast_from_dict({"prompt": "a party", "seed": 3, "layout": "custom", "identityStrength": 0.5,
                                  "characters": [
                                      {"prompt": "a", "box": [0, 0, .5, 1], "identityEmbedding": list(EMB[0])},
                                      {"prompt": "b", "box": [.5, 0, 1, 1]}]})
    assert req.kind == "cast" and req.seed == 3 and req.identity_strength == 0.5
    assert req.characters[0].has_identity and not req.characters[1].has_identity
    with pytest.raises(RequestValidationError) as e:
        cast_from_dict({"prompt": "x", "characters": [{"prompt": "a"}, {"prompt": "b", "avatar": "av_1"}]})
    assert e.value.param == "characters[1].avatar"


# ---- regional attention, one layer ------------------------------------------------------------

def _layer(masks: torch.Tensor, has_face, latent_hw=(16, 16)):
    """One cross-attention layer with its lifetime processor in regional mode at UNet level 0."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8).eval()
    cond = CallConditioning()
    proc = AvatarAttnProcessor(cond, level=0, cross=True)
    proc.identity = IdentityWeights(None, torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False))
    values = regional_conditioning(_padded(masks), torch.tensor([has_face]), latent_hw, 1, "cpu", torch.float32)
    cond.mode, cond.region_weights, cond.face_masks = "regional", values["region_weights"], values["face_masks"]
    cond.face_scale, cond.lora_weight = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    return attn, proc, cond


def test_one_character_changes_a_layer_only_inside_its_region():
    """Text and identity of character 0 reach exactly the queries its region covers, and
    nearly all of them."""
    masks = region_masks([(0.0, 0.0, 0.45, 1.0), (0.55, 0.0, 1.0, 1.0)], 64, 64)
    attn, proc, cond = _layer(masks, [True, True, False, False])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, 32, generator=g)
    text = torch.randn(1, REGIONAL_PROMPTS * 77, 32, generator=g)
    faces = torch.randn(1, MAX_CHARACTERS, 4, 32, generator=g)

    def run(text, faces):
        cond.faces = faces
        with torch.no_grad():
            return proc(attn, x, text)[0]

    base = run(text, faces)
    region = cond.region_weights[0][0, 1, :, 0] > 0
    assert 0.3 < region.float().mean() < 0.6
    text2 = text.clone()
    text2[:, 77:154] = torch.randn(1, 77, 32, generator=g)  # character 0's prompt
    changed = (run(text2, faces) - base).abs().amax(-1) > 0
    assert not (changed & ~region).any() and changed[region].float().mean() > 0.9

    faces2 = faces.clone()
    faces2[:, 0] = torch.randn(4, 32, generator=g)  # character 0's face
    changed = (run(text, faces2) - base).abs().amax(-1) > 0
    assert not (changed & ~region).any() and changed[region].float().mean() > 0.9


def test_a_face_under_a_zero_mask_contributes_exactly_nothing():
    masks = region_masks([(0.0, 0.0, 0.45, 1.0), (0.55, 0.0, 1.0, 1.0)], 64, 64)
    attn, proc, cond = _layer(masks, [True, False, False, False])  # character 1 has no face
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 256, 32, generator=g), torch.randn(1, REGIONAL_PROMPTS * 77, 32, generator=g)
    faces = torch.randn(1, MAX_CHARACTERS, 4, 32, generator=g)
    faces2 = faces.clone()
    faces2[:, 1:] = torch.randn(MAX_CHARACTERS - 1, 4, 32, generator=g) * 100
    with torch.no_grad():
        cond.faces = faces
        a = proc(attn, x, text)
        cond.faces = faces2
        b = proc(attn, x, text)
    assert torch.equal(a, b)


def test_processors_live_as_long_as_the_model(tiny_engine):
    """A cast call changes data, not modules: the same processor objects before and after, and
    the conditioning back to plain."""
    unet = tiny_engine.load().pipe.unet
    before = dict(unet.attn_processors)
    assert all(isinstance(p, AvatarAttnProcessor) for p in before.values())
    tiny_engine.generate(cast(2, steps=1))
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert unet.avatar_conditioning.mode == "plain" and unet.avatar_conditioning.faces is None


# ---- whole pipeline ---------------------------------------------------------------------------

def test_identical_region_prompts_reproduce_plain_generation(tiny_engine):
    """With every region prompted like the scene, the blend is the plain cross-attention."""
    plain = tiny_engine.generate(GenerationRequest(prompt="astronauts on mars", seed=5, steps=STEPS)).images[0]

    def same_prompts(plan):
        plan.region_prompts = [plan.scene] * len(plan.region_prompts)

    assert max_diff(render(tiny_engine, cast(3, seed=5), same_prompts), plain) <= 2


def test_a_character_with_an_empty_region_changes_nothing(tiny_engine):
    boxes = [(0.0, 0.0, 0.3, 1.0), (0.35, 0.0, 0.65, 1.0), (0.7, 0.0, 1.0, 1.0)]
    chars = [CastCharacter("a woman", identity_embedding=EMB[0], box=boxes[0]), CastCharacter("a man", box=boxes[1]),
             CastCharacter("a robot", identity_embedding=EMB[1], box=boxes[2])]
    ref = render(tiny_engine, cast(characters=chars), empty_region(2))
    other = chars[:2] + [CastCharacter("a purple dragon breathing fire", identity_embedding=EMB[2], box=boxes[2])]
    no_identity = chars[:2] + [CastCharacter("a robot", box=boxes[2])]
    assert max_diff(ref, render(tiny_engine, cast(characters=other), empty_region(2))) == 0
    assert max_diff(ref, render(tiny_engine, cast(characters=no_identity), empty_region(2))) == 0
    # ... and is the same as leaving the character out.
    assert max_diff(ref, render(tiny_engine, cast(characters=chars[:2]))) == 0


def test_changing_a_character_changes_its_region_most():
    """Locality at a size where it is measurable (256 px: a 32×32 latent, several tokens per
    region at every level): changing one character's prompt changes its own region clearly more
    than the other character's (self-attention and convolutions still carry some change across,
    so outside is not zero), and the same holds mirrored."""
    import dataclasses

    from avatar_engine import AvatarEngine, EngineConfig, load_profiles

    profiles = load_profiles()
    profiles["tiny-256"] = dataclasses.replace(profiles["tiny-sd15"], name="tiny-256", resolution=256)
    engine = AvatarEngine(EngineConfig(device="cpu", default_model="tiny-256"), profiles=profiles)
    boxes = [(0.0, 0.0, 0.45, 1.0), (0.55, 0.0, 1.0, 1.0)]
    prompts = ["a woman in a red suit", "a man in a blue suit"]

    def render_with(i, prompt):
        chars = [CastCharacter(p, box=b) for p, b in zip(prompts, boxes)]
        chars[i] = CastCharacter(prompt, box=boxes[i])
        return pixels(engine.generate(cast(characters=chars, seed=1, steps=2)).images[0])

    base = pixels(engine.generate(cast(characters=[CastCharacter(p, box=b) for p, b in zip(prompts, boxes)],
                                       seed=1, steps=2)).images[0])
    left, right = slice(0, 115), slice(141, 256)
    d0 = np.abs(render_with(0, "a green robot with antennas") - base).mean(-1)
    assert d0[:, left].mean() > 1.3 * d0[:, right].mean()
    d1 = np.abs(render_with(1, "a green robot with antennas") - base).mean(-1)
    assert d1[:, right].mean() > 1.3 * d1[:, left].mean()


@pytest.mark.parametrize("n,aspect", [(2, "1:1"), (3, "16:9"), (4, "9:16"), (4, "1:1")])
def test_two_to_four_characters(tiny_engine, n, aspect):
    chars = [CastCharacter(f"person {i}", identity_embedding=EMB[i] if i % 2 == 0 else None) for i in range(n)]
    res = tiny_engine.generate(cast(characters=chars, aspect_ratio=aspect, steps=4))
    w, h = res.request.width, res.request.height
    assert res.images[0].size == (w, h)
    report = res.report.to_json()["characters"]
    assert [c["index"] for c in report] == list(range(n))
    assert [c["hasIdentity"] for c in report] == [i % 2 == 0 for i in range(n)]
    assert [c["identitySource"] for c in report] == ["embedding" if i % 2 == 0 else None for i in range(n)]
    assert res.report.layout == ("rows" if aspect == "9:16" else "columns")
    for c in report:
        x0, y0, x1, y1 = c["pixelBox"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert c["similarity"] is None  # the tiny model draws no faces: nothing to score
        assert c["images"] == [{"similarity": None, "distance": None, "sameIdentity": None, "faceBox": None,
                                "foundInRegion": None}]
    json.dumps(result_to_wire(res))


def test_tiny_sdxl_cast_with_identity(tiny_engine):
    chars = [CastCharacter("a woman", identity_embedding=EMB[0]), CastCharacter("a man")]
    res = tiny_engine.generate(cast(characters=chars, model="tiny-sdxl", steps=4))
    again = tiny_engine.generate(cast(characters=chars, model="tiny-sdxl", steps=4))
    assert res.images[0].size == (64, 64) and max_diff(res.images[0], again.images[0]) == 0


def test_deterministic_per_seed(tiny_engine):
    chars = [CastCharacter("a woman", identity_embedding=EMB[0]), CastCharacter("a man", identity_embedding=EMB[1])]
    a, b = tiny_engine.generate([cast(characters=chars, seed=3), cast(characters=chars, seed=3)])
    c = tiny_engine.generate(cast(characters=chars, seed=4))
    assert max_diff(a.images[0], b.images[0]) == 0
    assert max_diff(a.images[0], c.images[0]) > 0


def test_batched_equals_unbatched(tiny_engine):
    """Different boxes, faces, prompt-only characters and character counts share a call (every
    cast runs the same padded layout); pixels do not change."""
    reqs = [
        cast(characters=[CastCharacter("a", identity_embedding=EMB[0]), CastCharacter("b")], seed=1, batch_size=2),
        cast(characters=[CastCharacter("c", box=[0, 0, .4, 1]), CastCharacter("d", identity_embedding=EMB[1],
                                                                               box=[.45, .2, 1, 1])], seed=2),
        cast(characters=[CastCharacter("e"), CastCharacter("f")], seed=3),  # prompt-only
        cast(3, seed=4),  # three characters
        cast(characters=[CastCharacter(str(i), identity_embedding=EMB[i]) for i in range(4)], seed=5,
             identity_strength=1.3),  # four faces, another strength
    ]
    batched = tiny_engine.generate(reqs)
    assert all(res.extra["batchImages"] == [6] for res in batched)
    for req, res in zip(reqs, batched):
        alone = tiny_engine.generate(req)
        for x, y in zip(res.images, alone.images):
            assert max_diff(x, y) <= 2


# ---- identity report --------------------------------------------------------------------------

class DescriptorScorer(FaceScorer):
    """A scorer over given descriptors (no face detection, no dlib): `describe` returns the faces
    queued for the next image, so the production matcher runs on known inputs."""

    name = "test-descriptors"

    def __init__(self, metric: str = "l2", threshold: float = 0.6):
        self.metric, self.threshold = metric, threshold
        self.faces: list[ScoredFace] = []

    def describe(self, image):
        return list(self.faces)


@pytest.mark.parametrize("metric", ["l2", "cosine-distance"])
def test_face_matching_is_one_to_one_and_optimal(metric):
    """match_faces (what cast's report runs) assigns each reference its own face with the least
    total scorer distance: not the first face, not greedy, and equal to brute force."""
    scorer = DescriptorScorer(metric)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(128) for _ in range(3))
    faces = [b + 0.05 * rng.standard_normal(128), a + 0.05 * rng.standard_normal(128)]  # in the order b, a
    m = match_faces(scorer, [a, None, b], faces)
    assert [fi for fi, _ in m] == [1, None, 0] and m[1] == (None, None)
    assert m[0][1].similarity > 0.99 and m[0][1].distance == pytest.approx(scorer.distance(a, faces[1]), abs=1e-4)
    assert sum(fi is not None for fi, _ in match_faces(scorer, [a, b, c], faces[:1])) == 1  # one face, one owner
    assert match_faces(scorer, [a, b], []) == [(None, None)] * 2
    assert match_faces(scorer, [None, None], faces) == [(None, None)] * 2
    if metric == "l2":
        # On a line: f0 = 0, f1 = 0.3, r0 = 0.1, r1 = -1. Greedy (closest pair first) takes r0-f0 (0.1)
        # and leaves r1-f1 (1.3), 1.4 in total; the optimum is r0-f1 + r1-f0 (0.2 + 1.0 = 1.2).
        f0, f1, r0, r1 = (np.array([v]) for v in (0.0, 0.3, 0.1, -1.0))
        assert [fi for fi, _ in match_faces(scorer, [r0, r1], [f0, f1])] == [1, 0]
    for _ in range(20):  # equals brute force on random cases
        refs = [rng.standard_normal(8) for _ in range(3)]
        fs = [rng.standard_normal(8) for _ in range(4)]
        got = sum(match.distance for _, match in match_faces(scorer, refs, fs))
        best = min(sum(scorer.distance(refs[i], fs[p[i]]) for i in range(3))
                   for p in itertools.permutations(range(4), 3))
        assert got == pytest.approx(best, abs=1e-3)


def test_identity_report_names_the_region_each_matched_face_is_in():
    """The report cast results carry: per character its matched face, the scorer's verdict, and
    the region the face was found in (a swapped face shows up in the other's region)."""
    scorer = DescriptorScorer("l2")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(128) * 0.1, rng.standard_normal(128) * 0.1 + 1.0
    regions = [(0, 0, 32, 64), (32, 0, 64, 64)]
    scorer.faces = [ScoredFace((40, 10, 60, 30), 0.99, a + 0.01), ScoredFace((5, 10, 25, 30), 0.98, b - 0.01)]
    per_char, counts = identity_report(scorer, [Image.new("RGB", (64, 64))], [a, b, None], regions)
    assert counts == [2]
    (ra,), (rb,), (rc,) = per_char
    assert ra["foundInRegion"] == 1 and rb["foundInRegion"] == 0  # swapped: each face sits in the other's region
    assert ra["sameIdentity"] is True and rb["sameIdentity"] is True
    assert ra["faceBox"] == [40.0, 10.0, 60.0, 30.0]
    assert rc == {"similarity": None, "distance": None, "sameIdentity": None, "faceBox": None, "foundInRegion": None}


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def group_face(tiny_engine) -> Image.Image:
    """One person's face cropped from insightface's group photo t1.jpg."""
    insightface = pytest.importorskip("insightface")
    t1 = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")).convert("RGB")
    face = tiny_engine.face_analyzer.embed(t1)[0]
    return _crop(t1, face.bbox)


def _crop(img: Image.Image, bbox, scale: float = 2.2) -> Image.Image:
    x0, y0, x1, y1 = bbox
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale / 2
    return img.crop((int(cx - s), int(cy - s), int(cx + s), int(cy + s))).resize((256, 256), Image.BICUBIC)


def test_swapping_photos_swaps_the_matched_identities(tiny_engine, astronaut, group_face):
    """Real photos through the real prepare/finalize path; the 'output' is a two-person picture
    (the tiny model draws no faces), astronaut on the left, the group-photo face on the right."""
    task = tiny_engine._tasks["cast"]
    model = tiny_engine.load()
    left = _crop(astronaut, tiny_engine.face_analyzer.embed(astronaut)[0].bbox)
    picture = Image.new("RGB", (512, 256))
    picture.paste(left, (0, 0))
    picture.paste(group_face, (256, 0))
    regions = [(0, 0, 256, 256), (256, 0, 512, 256)]

    def report(photos):
        chars = [CastCharacter("left", photos=[png_bytes(photos[0])]),
                 CastCharacter("right", photos=[png_bytes(photos[1])]), CastCharacter("nobody")]
        req = tiny_engine.resolve(cast(characters=chars))
        plan = task.prepare(model, req)
        plan.pixel_boxes = regions + [(0, 0, 1, 1)]
        result = GenerationResult(request=req, images=[picture], seeds=req.image_seeds())
        task.finalize(model, result, plan)
        assert result.report.faces_detected == [2]
        return result.report.to_json()["characters"]

    require_dlib()
    straight = report([astronaut, group_face])
    assert [c["images"][0]["foundInRegion"] for c in straight[:2]] == [0, 1]
    assert all(c["sameIdentity"] is True and c["images"][0]["distance"] < 0.6 for c in straight[:2])
    assert all(c["similarity"] > 0.95 for c in straight[:2])  # dlib cosine: same person ≥ 0.99 on real photos
    assert straight[2]["hasIdentity"] is False and straight[2]["similarity"] is None
    swapped = report([group_face, astronaut])
    assert [c["images"][0]["foundInRegion"] for c in swapped[:2]] == [1, 0]
    assert swapped[0]["similarity"] == straight[1]["similarity"]
    # the function the task uses, with one identity and two faces: it picks its own face, wherever it is
    from avatar_engine.faces.descriptors import reference_descriptor
    from avatar_engine.tasks import face_scorer

    scorer = face_scorer(tiny_engine)
    assert straight[0]["images"][0]["sameIdentity"] and tiny_engine.face_analyzer is not scorer
    own = reference_descriptor(scorer, group_face)
    per_char, counts = identity_report(scorer, [picture], [None, own], regions)
    assert counts == [2] and per_char[0][0]["similarity"] is None and per_char[1][0]["foundInRegion"] == 1
    # the other person's face, assigned to nobody, would not pass as this identity
    other = scorer.compare(own, reference_descriptor(scorer, left))
    assert not other.same and other.distance > 0.6


def test_a_characters_photos_of_two_people_are_refused(tiny_engine, astronaut, group_face):
    """One character's photos must be one person: refused naming the photo, at validation (a
    service's submit) and in the engine; edited copies of one photo pass."""
    from avatar_engine import IdentityMismatchError

    require_dlib()
    mixed = [CastCharacter("a", photos=[png_bytes(astronaut)]),
             CastCharacter("b", photos=[png_bytes(group_face), png_bytes(astronaut.resize((256, 256)))])]
    with pytest.raises(IdentityMismatchError) as err:
        cast(characters=mixed).validate()
    assert err.value.param == "characters[1].photos[1]" and "does not show the same person" in err.value.message
    with pytest.raises(IdentityMismatchError):
        tiny_engine.generate(cast(characters=mixed))
    same = [CastCharacter("a", photos=[png_bytes(astronaut), png_bytes(astronaut.resize((300, 300)))]),
            CastCharacter("b", photos=[png_bytes(Image.new("RGB", (8, 8)))])]  # no face: left to the face policy
    cast(characters=same).validate()


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_cast_writes_png_and_report(tiny_engine, tmp_path, monkeypatch, capsys, astronaut):
    import avatar_engine.cli as cli
    import avatar_engine.cli.cast as cast_command

    monkeypatch.setattr(cast_command, "make_engine", lambda args: tiny_engine)
    photo = tmp_path / "a.png"
    astronaut.save(photo)
    out = tmp_path / "out"
    rc = cli.main(["cast", "--scene", "two astronauts on mars", "--character", "a woman in a red suit",
                   "--character", "a man in a blue suit", "--photo", f"1={photo}", "--box", "1=0,0,0.5,1",
                   "--box", "2=0.5,0,1,1", "--seed", "9", "--steps", "3", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    pngs = list(out.glob("cast-*.png"))
    meta = json.loads(next(out.glob("cast-*.json")).read_text())
    assert len(pngs) == 1 and meta["kind"] == "cast" and meta["seed"] == 9 and meta["layout"] == "custom"
    chars = meta["characters"]
    assert [c["box"] for c in chars] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    assert [c["identitySource"] for c in chars] == ["photos", None]

    rc = cli.main(["cast", "--scene", "x", "--character", "a", "--character", "b", "--photo", f"3={photo}",
                   "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error (--photo):") and "Traceback" not in err
    rc = cli.main(["cast", "--scene", "x", "--character", "a", "--character", "b", "--box", "2=0,0,2,1",
                   "-o", str(out)])
    assert rc == 2 and capsys.readouterr().err.startswith("error (characters[1].box):")
