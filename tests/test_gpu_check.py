"""`make gpu-check` (pipelines/gpu_check.py) runs on the CPU at the tiny shape, so that it cannot rot
before a GPU is lent: every section measures, and it runs where ray and webdataset are missing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipelines import gpu_check

# As on the lent GPU machine: ray and webdataset cannot be imported.
WITHOUT_RAY_AND_WEBDATASET = textwrap.dedent("""
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "webdataset"):
                raise ModuleNotFoundError(f"No module named {name!r} (as on the GPU machine)", name=name)

    sys.meta_path.insert(0, Missing())
    from pipelines import gpu_check

    rc = gpu_check.main(sys.argv[1:])
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "webdataset"))
    sys.exit(f"imported {imported}" if imported else rc)
""")

TINY = ["--device", "cpu", "--shape", "tiny", "--batch-sizes", "1,2", "--images", "2", "--num-captions", "2",
        "--decode-images", "4", "--finetune-steps", "3"]


def rate(measured):
    assert "error" not in measured and "skipped" not in measured, measured
    return measured["images_per_s"]


@pytest.mark.timeout(600)
def test_every_section_measures_on_cpu_without_ray_or_webdataset(tmp_path):
    out = tmp_path / "gpu_check.json"
    # One torch thread: on 2 cores shared with other tests, OpenMP's spinning threads take 4x longer.
    # This test holds structure, never speed.
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY_AND_WEBDATASET, *TINY, "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["stopped_early"] is None
    env = result["environment"]
    assert env["absent"] == ["ray", "webdataset"] and env["torch"] and env["transformers"]
    assert result["device"]["device"] == "cpu"

    rows = result["throughput"]["tiny"]
    for batch in ("batch_1", "batch_2"):
        assert rate(rows[batch]["capfilt"]) > 0 and rate(rows[batch]["naive"]) > 0
        assert rows[batch]["capfilt_vs_naive"] > 0
        assert rate(rows[batch]["capfilt_staged"]) > 0 and rows[batch]["staged_vs_unstaged"] > 0
        # every batch but the first of the timed run's was judged from its stage
        assert rows[batch]["capfilt_staged"]["staged_batches"] == rows[batch]["capfilt_staged"]["images"] // int(batch[6:]) - 1
    assert rows["batch_2"]["capfilt"]["images"] == 2 and rows["batch_2"]["naive"]["images"] == 2
    # What auto gives this device: the CPU's defaults, with the estimate a GPU's batch comes from.
    auto = rows["auto"]
    assert (auto["batch_size"], auto["dtype"], auto["tf32"]) == (16, "float32", False), auto
    assert auto["per_image_estimate_mb"] > 0

    decode = result["decode"]
    for size in ("1024x768", "384x384"):
        assert all(rate(decode[size][way]) > 0 for way in ("one_thread", "threads", "processes"))
    assert decode["workers"] >= 1

    parity = result["parity"]
    assert parity["device"] == "cpu" and parity["itm_cls_float32"]["pairs"] == 12
    for token in ("cls", "enc"):
        itm = parity[f"itm_{token}_float32"]
        # well below what scoring a text against another image moves: the images count
        assert itm["max_abs_diff"] < min(1e-4, itm["other_image_max_diff"] / 10), itm
    assert parity["itm_cls_bfloat16"]["max_abs_diff"] < 0.05
    captions = parity["captions_greedy_float32"]
    assert captions["captions"] == 4 and captions["equal"] == 4

    for loop in ("capfilt", "naive"):
        syncs = result["syncs"][loop]
        assert 0 < syncs["steps"] <= 20  # one generate, of at most max_length tokens
        assert syncs["per_step"] == round(sum(syncs["calls"].values()) / syncs["steps"], 2) > 0
        assert syncs["sites"]
        assert "skipped" in syncs["cuda_syncs_per_step"]

    for kind in ("captioner", "filter"):
        trained = result["finetune"][kind]
        assert trained["steps"] == 3 and trained["steps_per_s"] > 0 and trained["loss_finite"] is True
        assert trained["evaluate"] and all(isinstance(v, float) for v in trained["evaluate"].values())

    assert "CUDA" in result["peak_memory"]["skipped"]
    assert {"end_to_end", "peak_memory", "syncs.capfilt.cuda_syncs_per_step"} <= set(result["skipped"])


def test_a_spent_budget_skips_what_had_not_started_and_says_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--shape", "tiny,base", "--budget-s", "0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "ran out at decode" in result["stopped_early"]
    for key in ("decode", "parity", "syncs", "finetune"):
        assert "budget" in result[key]["skipped"]
    assert set(result["throughput"]) == {"tiny", "base"}
    assert {"decode", "throughput.tiny", "throughput.base"} <= set(result["skipped"])


def test_cuda_asked_where_there_is_none_is_an_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--device", "cuda", "--output", str(tmp_path / "g.json")]) == 2
