"""AvatarEngine behaviour on the tiny models: determinism, batching invariants, shapes."""
import numpy as np
from PIL import Image

from avatar_engine import AvatarEngine, EngineConfig, GenerationRequest
from avatar_engine.protocol import result_to_wire


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_same_seed_same_image_different_seed_different(tiny_engine):
    a = tiny_engine.generate(GenerationRequest(prompt="a knight", seed=7, steps=6))
    b = tiny_engine.generate(GenerationRequest(prompt="a knight", seed=7, steps=6))
    c = tiny_engine.generate(GenerationRequest(prompt="a knight", seed=8, steps=6))
    assert max_diff(a.images[0], b.images[0]) == 0
    assert max_diff(a.images[0], c.images[0]) > 10


def test_batched_equals_unbatched(tiny_engine):
    reqs = [GenerationRequest(prompt=f"portrait number {i}", seed=100 + i, batch_size=1 + i % 3, steps=6,
                              style_preset=["anime", None, "cyberpunk"][i % 3]) for i in range(5)]
    batched = tiny_engine.generate(reqs)
    assert max(max(r.extra["batchImages"]) for r in batched) == sum(r.batch_size for r in reqs)  # one call
    for req, res in zip(reqs, batched):
        alone = tiny_engine.generate(req)
        assert res.seeds == alone.seeds
        for x, y in zip(res.images, alone.images):
            assert max_diff(x, y) <= 2  # float reassociation across batch sizes only


def test_image_i_of_a_request_equals_a_single_image_with_its_seed(tiny_engine):
    multi = tiny_engine.generate(GenerationRequest(prompt="a wizard", seed=40, batch_size=3, steps=6))
    assert multi.seeds == [40, 41, 42]
    single = tiny_engine.generate(GenerationRequest(prompt="a wizard", seed=41, steps=6))
    assert max_diff(multi.images[1], single.images[0]) <= 2


def test_results_keep_request_order_across_groups(tiny_engine):
    reqs = [GenerationRequest(prompt="a", seed=1, aspect_ratio="16:9", steps=3), GenerationRequest(prompt="b", seed=2, steps=3),
            GenerationRequest(prompt="c", seed=3, aspect_ratio="16:9", batch_size=2, steps=3),
            GenerationRequest(prompt="d", seed=4, steps=5)]
    results = tiny_engine.generate(reqs)
    assert [r.request.prompt for r in results] == ["a", "b", "c", "d"]
    assert results[0].images[0].size == (80, 48) and results[1].images[0].size == (64, 64)
    assert len(results[2].images) == 2 and results[3].request.steps == 5


def test_max_batch_splits_calls_without_changing_pixels():
    engine = AvatarEngine(EngineConfig(device="cpu", max_batch_size=2))
    reqs = [GenerationRequest(prompt=f"p{i}", seed=i, steps=4) for i in range(5)]
    results = engine.generate(reqs)
    assert all(max(r.extra["batchImages"]) <= 2 for r in results)
    wide = AvatarEngine(EngineConfig(device="cpu", max_batch_size=16)).generate(reqs)
    for a, b in zip(results, wide):
        assert max_diff(a.images[0], b.images[0]) <= 2


def test_progress_reports_every_step(tiny_engine):
    seen = []
    tiny_engine.generate([GenerationRequest(prompt="a", seed=1, steps=4), GenerationRequest(prompt="b", seed=2, steps=3)],
                         progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]


def test_result_reports_seed_model_timings(tiny_engine):
    res = tiny_engine.generate(GenerationRequest(prompt="a", style_preset="fantasy", steps=3))
    data = result_to_wire(res)
    assert data["model"] == "tiny-sd15" and isinstance(data["seed"], int)
    assert data["timings"]["generationMs"] > 0 and "fantasy" in data["promptReport"]["prompt"]
    assert isinstance(res.images[0], Image.Image) and res.images[0].mode == "RGB"


def test_img2img_follows_init_image(tiny_engine):
    base = tiny_engine.generate(GenerationRequest(prompt="a", seed=3, steps=6)).images[0]
    white = Image.new("RGB", (64, 64), "white")
    black = Image.new("RGB", (64, 64), "black")
    w = tiny_engine.generate(GenerationRequest(prompt="a", seed=3, init_image=white, strength=0.5, steps=6)).images[0]
    k = tiny_engine.generate(GenerationRequest(prompt="a", seed=3, init_image=black, strength=0.5, steps=6)).images[0]
    assert max_diff(w, k) > 10 and w.size == base.size
    again = tiny_engine.generate(GenerationRequest(prompt="a", seed=3, init_image=white, strength=0.5, steps=6)).images[0]
    assert max_diff(w, again) == 0


def test_tiny_sdxl_two_encoders_batched_equals_unbatched(tiny_engine):
    reqs = [GenerationRequest(prompt=f"sdxl portrait {i}", seed=i, model="tiny-sdxl", steps=6) for i in range(3)]
    batched = tiny_engine.generate(reqs)
    model = tiny_engine.load("tiny-sdxl")
    assert len(model.prompt_builder.tokenizers) == 2
    for req, res in zip(reqs, batched):
        assert max_diff(res.images[0], tiny_engine.generate(req).images[0]) <= 2


def test_default_speed_options_on_cpu(tiny_engine):
    applied = tiny_engine.load().applied
    assert applied["attention"] == "sdpa" and applied["dtype"] == "float32"
    assert "compile" not in applied  # off by default on CPU
