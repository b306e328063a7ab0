"""The benchmark-only engine (benchmarks/bench_engine.py, outside the service package):
deterministic images at the profile's size, the configured per-image cost, only its two documented
specs, and the `engine_factory` setting through which a model replica builds it."""
from __future__ import annotations

import time

import numpy as np
import pytest

from avatar_engine.requests import GenerationRequest
from benchmarks.bench_engine import BenchEngine, parse_spec
from serve.engine_client import build_engine
from serve.settings import ServiceSettings


def test_null_engine_makes_deterministic_textured_images_at_the_requested_size():
    engine = BenchEngine("null")
    assert set(engine.profiles) == {"bench-null", "bench-null-1024"} and engine.default_model == "bench-null"
    reqs = [GenerationRequest(prompt="x", seed=5, batch_size=2),
            GenerationRequest(prompt="y", seed=5, model="bench-null-1024")]
    a, big = engine.generate(reqs)
    again = engine.generate(reqs[:1])[0]
    assert [im.size for im in a.images] == [(512, 512)] * 2 and big.images[0].size == (1024, 1024)
    assert a.seeds == [5, 6]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(again.images[0]))  # same seed, same image
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    assert np.asarray(a.images[0]).std() > 20  # textured, not a flat colour that compresses to nothing


def test_sleep_engine_costs_its_time_per_512_image():
    engine = BenchEngine("sleep:20")
    assert engine.default_model == "bench-sleep" and engine.seconds_per_reference_image == 0.02
    t0 = time.perf_counter()
    engine.generate([GenerationRequest(prompt="x", seed=1, batch_size=3)])
    assert time.perf_counter() - t0 >= 0.06  # a lower bound: it sleeps at least that long


def test_the_benchmark_engine_takes_only_its_documented_specs():
    assert parse_spec("null") == ("bench-null", 0.0)
    assert parse_spec("sleep:50") == ("bench-sleep", 0.05)
    for bad in ("sleep", "sleep:-1", "tiny-sd15", "sleep:abc"):
        with pytest.raises(ValueError, match="spec"):
            BenchEngine(bad)


def test_a_replica_builds_the_benchmark_engine_only_through_engine_factory():
    assert ServiceSettings().engine_factory is None  # off unless asked for
    settings = ServiceSettings(engine_factory="benchmarks.bench_engine:BenchEngine", engine_args={"spec": "sleep:5"})
    runner = build_engine(settings)
    assert runner.default_model == "bench-sleep"
    assert set(runner.describe(["bench-sleep", "bench-sleep-1024"]).names()) == {"bench-sleep", "bench-sleep-1024"}
    result = runner.generate([GenerationRequest(prompt="x", seed=3)])[0]
    assert result.images[0].size == (512, 512) and result.seeds == [3]
    for bad in ("benchmarks.bench_engine", "a:b:c", "no such:thing"):
        with pytest.raises(ValueError, match="engine_factory"):
            ServiceSettings(engine_factory=bad)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_engine(ServiceSettings(engine_factory="benchmarks.bench_engine:NoSuchEngine"))
