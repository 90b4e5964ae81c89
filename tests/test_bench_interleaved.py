"""bench (issue 28): settings interleaved round-robin, the clock, medians with spread, and the
vision / compression split read inside the timed prefill."""

import math

import pytest

import globalcom2
from globalcom2 import bench
from conftest import make_image


def test_settings_run_round_robin_and_ratios_pair_rounds(tiny, monkeypatch):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    seen = []
    measure = bench._measure

    def recording(fn, *args, **kwargs):
        config = globalcom2.get_config(model)
        seen.append(None if config is None else config.retention_ratio)
        return measure(fn, *args, **kwargs)

    monkeypatch.setattr(bench, "_measure", recording)
    rows = bench.run_bench(model, dict(inputs), [0.5, 0.25], max_new_tokens=2, runs=3, warmup=1)
    # 4 rounds, each: every setting's prefill then its generate, in the settings' order
    assert seen == [None, None, 0.5, 0.5, 0.25, 0.25] * 4
    for row in rows:
        assert row.runs == 3 and row.clock == "wall"
        assert all(len(row.samples[k]) == 3 for k in ("prefill_ms", "lm_prefill_ms", "generate_ms", "vision_ms"))
        assert row.prefill_ms == sorted(row.samples["prefill_ms"])[1] and row.prefill_spread >= 0
    base = rows[0]
    pairs = sorted(a / b for a, b in zip(rows[2].samples["prefill_ms"], base.samples["prefill_ms"]))
    assert rows[2].prefill_x == pytest.approx(pairs[1])


def test_vision_and_compression_are_read_inside_the_prefill(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=1, runs=2, warmup=0, clock="cpu",
                           methods=("globalcom2", "fastv"))
    vanilla, gc, fastv = rows
    assert vanilla.compress_ms == 0.0 and fastv.compress_ms == 0.0 and gc.compress_ms > 0
    for row in rows:
        assert row.clock == "cpu" and row.vision_ms > 0
        for i in range(2):  # each round's parts fit inside that round's prefill
            s = row.samples
            assert s["vision_ms"][i] + s["compress_ms"][i] + s["lm_prefill_ms"][i] <= s["prefill_ms"][i] * 1.001 + 0.05
        assert math.isnan(row.decode_ms_per_token)
    assert not globalcom2.is_applied(model)


def test_an_unknown_clock_is_refused(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    with pytest.raises(ValueError, match="clock"):
        bench.run_bench(model, dict(inputs), [0.25], runs=1, warmup=0, clock="gpu")
