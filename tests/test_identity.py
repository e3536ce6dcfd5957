"""An output folder holds exactly one config's output: the identity, its fingerprint, the done
markers that record it, and the refusal that names what changed."""

import json
import shutil

import pytest
from conftest import make_web_shards

from capfilt.config import load_config
from capfilt.identity import RunRefused, changes, fingerprint, output_identity
from capfilt.io.fs import OutputDir
from capfilt.io.layout import stats_name
from capfilt.run import check_models, run
from capfilt.runtime.shards import ShardTask, split_done
from capfilt.stats import ShardStats

LARGE = "configs/blip_large.yaml"
WEIGHTS = {"captioner": "commit:aaa", "filter": "commit:bbb"}


def fp(overrides=(), weights=WEIGHTS, **top_level):
    return fingerprint(output_identity(load_config(LARGE, list(overrides), **top_level), weights))


@pytest.mark.parametrize("override", [
    "filter.threshold=0.6", "captioner.model=Salesforce/blip-image-captioning-base", "filter.model=other/itm",
    "captioner.num_captions=3", "runtime.seed=1", "runtime.dtype=bfloat16", "runtime.batch_size=4",
    "reader.max_image_pixels=1000", "writer.layout=pairs"])
def test_the_fingerprint_covers_what_changes_the_output(override):
    assert fp([override]) != fp()


def test_the_fingerprint_covers_the_device_kind():
    assert fp(["runtime.device=cuda"]) != fp(["runtime.device=cpu"])
    assert fp(["runtime.device=auto"]) == fp(["runtime.device=cpu"])  # this machine has no GPU


def test_the_fingerprint_covers_the_weights():
    assert fp(weights={**WEIGHTS, "filter": "sha256:ccc"}) != fp()


def test_the_fingerprint_ignores_placement_input_and_output():
    moved = fp(["runtime.num_workers=7", "runtime.decode_threads=5"], input="other/{0..9}.tar", output="elsewhere")
    assert moved == fp()
    # A cluster's machines decide what 'auto' is; a pinned device is the same anywhere.
    assert fp(["runtime.device=cpu", "runtime.ray_address=10.0.0.1:6379"]) == fp(["runtime.device=cpu"])


def test_changes_name_each_key_that_differs():
    old = output_identity(load_config(LARGE, ["filter.threshold=0.3"]), WEIGHTS)
    new = output_identity(load_config(LARGE, ["filter.threshold=0.6", "runtime.batch_size=4"]),
                          {**WEIGHTS, "filter": "sha256:ccc"})
    assert changes(old, new) == ["filter.threshold: 0.3 -> 0.6", "runtime.batch_size: 16 -> 4",
                                 'weights.filter: "commit:bbb" -> "sha256:ccc"']


def test_only_a_marker_of_this_fingerprint_marks_a_shard_done(tmp_path):
    out = OutputDir(str(tmp_path))
    markers = {
        "mine": ShardStats(shard="mine", fingerprint="f1").to_json(),
        "other_config": ShardStats(shard="other_config", fingerprint="f0").to_json(),
        "before_fingerprints": ShardStats(shard="before_fingerprints").to_json(),
        # img2dataset writes NAME_stats.json beside each tar it downloads
        "img2dataset": json.dumps({"count": 10, "successes": 9, "failed_to_download": 1}).encode(),
        "empty": b"",
        "cut_short": ShardStats(shard="cut_short", fingerprint="f1").to_json()[:20],
        "not_an_object": b"[1, 2]",
    }
    for name, data in markers.items():
        (tmp_path / stats_name(name)).write_bytes(data)
    tasks = [ShardTask(url=f"in/{n}.tar", name=n, output=str(tmp_path)) for n in [*markers, "absent"]]
    pending, done = split_done(tasks, out, "f1")
    assert [t.name for t in done] == ["mine"]
    assert len(pending) == len(tasks) - 1


def test_swapped_weights_behind_a_folder_refuse_to_resume(tiny_models, tmp_path):
    """Same config, same folder name, other files: a rerun is refused, naming the weights."""
    cap, itm = tiny_models
    filter_copy = tmp_path / "filter"
    shutil.copytree(itm, filter_copy)
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    overrides = [f"captioner.model={cap}", f"filter.model={filter_copy}"]
    config = load_config("configs/tiny.yaml", overrides, input=str(tmp_path / "web"), output=str(tmp_path / "out"))
    before = check_models(config)
    assert run(config, progress=False).exit_code == 0
    # other weights of the same shapes under the same folder (one head retrained, say)
    from safetensors.torch import load_file, save_file

    tensors = load_file(filter_copy / "model.safetensors")
    tensors["itm_head.bias"] = tensors["itm_head.bias"] + 1
    save_file(tensors, filter_copy / "model.safetensors", metadata={"format": "pt"})
    after = check_models(config)
    assert after["filter"] != before["filter"] and after["captioner"] == before["captioner"]
    with pytest.raises(RunRefused, match=r'weights\.filter: "sha256:\w+" -> "sha256:\w+"'):
        run(config, progress=False)


def test_a_run_into_a_selection_is_refused_unless_overwrite(tmp_path):
    from capfilt.io.layout import SELECT_FILE
    from capfilt.run import check_compatible

    (tmp_path / SELECT_FILE).write_text("{}")
    with pytest.raises(RunRefused, match="holds a selection made by capfilt select"):
        check_compatible(OutputDir(str(tmp_path)), {}, "f1", "incremental")
    check_compatible(OutputDir(str(tmp_path)), {}, "f1", "overwrite")
