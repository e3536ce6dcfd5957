"""The benchmark script still runs end to end (a smoke test: it asserts structure, never speed)."""

import json

import pytest

from pipelines import bench


@pytest.mark.timeout(400)
def test_bench_tiny_shape_writes_every_measurement(tmp_path):
    # The tiny BLIP shape and float32 only: the models' speed is not what this checks (the small
    # shape's model calls were most of this test's time, and bfloat16 doubled it).
    assert bench.main(["--shape", "tiny", "--dtypes", "float32", "--images", "4", "--batch-size", "2",
                       "--num-captions", "2", "--decode-images", "2", "--repeats", "1", "--select-samples", "200",
                       "--select-shards", "2", "--select-repeats", "1", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["decode"]["sizes"]) == {"1024x768", "384x384"}
    assert all(r["now_images_per_s"] > 0 and r["before_images_per_s"] > 0 for r in result["decode"]["sizes"].values())
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
    assert set(result["ratios"]) == {"end_to_end_float32/model_only_float32", "end_to_end_float32/naive_float32",
                                     "model_only_float32/naive_float32"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("models", ["blip2-opt-2.7b", "clip-l14"])
def test_bench_other_models_at_tiny_widths(tmp_path, monkeypatch, models):
    # The BLIP-2 and CLIP code paths of the bench (building, the naive loop, capfilt's model-only
    # run) at tiny widths; decode, select, end to end and the fresh process per measurement are
    # the test above's. Here every measurement runs in this process, as a worker would set it up
    # but for the allocator (that setting would outlive the test): seconds, not a spawn's imports each.
    import capfilt.runtime.executor

    monkeypatch.setattr(bench, "isolated", lambda threads, fn, *args: fn(*args))
    monkeypatch.setattr(capfilt.runtime.executor, "configure_worker_process", lambda cpus, retain: cpus)
    assert bench.main(["--models", models, "--shape", "tiny", "--size", "tiny", "--depth-fraction", "0.5",
                       "--dtypes", "bfloat16", "--naive-dtype", "bfloat16", "--images", "3", "--batch-size", "2",
                       "--num-captions", "2", "--repeats", "1", "--skip", "decode", "--skip", "select",
                       "--skip", "end-to-end", "--threads", "2", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["models"] == models and result["depth_fraction"] == 0.5
    for name in ("naive_bfloat16", "model_only_bfloat16"):
        assert result[name]["images"] == 3 and result[name]["images_per_s"] > 0, name
    assert result["ratios"] == {"model_only_bfloat16/naive_bfloat16": pytest.approx(
        result["model_only_bfloat16"]["images_per_s"] / result["naive_bfloat16"]["images_per_s"])}
    filter_config = json.loads(next(tmp_path.glob(f"models_{models}_*/filter/config.json")).read_text())
    assert filter_config["model_type"] == {"blip2-opt-2.7b": "blip-2", "clip-l14": "clip"}[models]
    assert filter_config["vision_config"]["num_hidden_layers"] == 1  # half of the tiny widths' two
    if models == "blip2-opt-2.7b":  # one frozen ViT-g in both, as in the hub's BLIP-2 checkpoints
        import torch
        from safetensors.torch import load_file

        folder = next(tmp_path.glob("models_blip2-opt-2.7b_*"))
        cap, itm = (load_file(folder / slot / "model.safetensors") for slot in ("captioner", "filter"))
        vision = [k for k in itm if k.startswith("vision_model.")]
        assert vision and all(torch.equal(cap[k], itm[k]) for k in vision)
