"""The benchmark script still runs end to end (a smoke test: it asserts structure, never speed)."""

import json

import pytest

from pipelines import bench


@pytest.mark.timeout(400)
def test_bench_small_shape_writes_every_measurement(tmp_path):
    # float32 only: bfloat16 is the same code at another dtype, and doubled this test's time.
    assert bench.main(["--shape", "small", "--dtypes", "float32", "--images", "4", "--batch-size", "2", "--num-captions", "2",
                       "--decode-images", "2", "--repeats", "1", "--select-samples", "200", "--select-shards", "2",
                       "--select-repeats", "1", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    select = result["select"]  # capfilt select against the tarfile loop, at a threshold that keeps about half
    assert select["samples"] == 200 and 50 < select["kept"] < 150
    assert select["kept"] == select["loop_kept"] and select["same_keys"], select
    assert select["select_samples_per_s"] > 0 and select["loop_samples_per_s"] > 0
    assert select["select/loop"] == pytest.approx(select["select_samples_per_s"] / select["loop_samples_per_s"])
    for name in ("naive_float32", "model_only_float32", "end_to_end_float32"):
        assert result[name]["images_per_s"] > 0 and len(result[name]["all_images_per_s"]) == 1, name
    e2e = result["end_to_end_float32"]
    assert e2e["rc"] == 0 and e2e["images"] == 4 and 0 < e2e["model_share"] <= 1
    assert all(mb > 0 for mb in e2e["worker_peak_rss_mb"].values())
    assert set(result["ratios"]) == {"end_to_end_float32/model_only_float32", "end_to_end_float32/naive_float32"}
