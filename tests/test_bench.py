"""The benchmark script still runs end to end (a smoke test: it asserts structure, never speed)."""

import json

import pytest

from pipelines import bench


@pytest.mark.timeout(400)
def test_bench_small_shape_writes_every_measurement(tmp_path):
    assert bench.main(["--shape", "small", "--images", "4", "--batch-size", "2", "--num-captions", "2",
                       "--decode-images", "2", "--repeats", "1", "--select-samples", "200", "--select-shards", "2",
                       "--select-repeats", "1", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    select = result["select"]  # capfilt select against the tarfile loop, at a threshold that keeps about half
    assert select["samples"] == 200 and 50 < select["kept"] < 150
    assert select["kept"] == select["loop_kept"] and select["same_keys"], select
    assert select["select_samples_per_s"] > 0 and select["loop_samples_per_s"] > 0
    assert select["select/loop"] == pytest.approx(select["select_samples_per_s"] / select["loop_samples_per_s"])
    for name in ("naive_float32", "model_only_float32", "end_to_end_float32",
                 "model_only_bfloat16", "end_to_end_bfloat16"):
        assert result[name]["images_per_s"] > 0 and len(result[name]["all_images_per_s"]) == 1, name
    for dtype in ("float32", "bfloat16"):
        e2e = result[f"end_to_end_{dtype}"]
        assert e2e["rc"] == 0 and e2e["images"] == 4 and 0 < e2e["model_share"] <= 1
        assert all(mb > 0 for mb in e2e["worker_peak_rss_mb"].values())
    assert set(result["ratios"]) == {f"end_to_end_{d}/{base}" for d in ("float32", "bfloat16")
                                     for base in (f"model_only_{d}", "naive_float32")}
    agreement = result["bfloat16_vs_float32"]
    assert agreement["texts"] == 4 and agreement["decision_agreement"] >= 0.75
