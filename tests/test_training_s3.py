"""``capfilt finetune`` with its output on S3 (moto's server on 127.0.0.1): the model and its
checkpoints land in the bucket, a rerun resumes from the checkpoint there, and the model loads."""

import json

import pytest
from test_s3 import BUCKET, get, keys, s3, storage  # noqa: F401 (s3 is the moto server fixture)
from test_training import write_pairs

from capfilt.io.fs import local_copy
from capfilt.io.layout import is_temporary
from capfilt.training import trainer as trainer_module
from pipelines.cli import main

OUTPUT = f"s3://{BUCKET}/ft/captioner"
PREFIX = "ft/captioner/"


def finetune(s3, data, max_steps: int) -> int:
    base = "finetune.captioner"
    return main(["finetune", "captioner", "--no-progress", storage(s3["endpoint"]),
                 f"{base}.train={data[0]}", f"{base}.val={data[1]}", f"{base}.output={OUTPUT}",
                 f"{base}.image_size=32", f"{base}.batch_size=16", f"{base}.warmup_steps=1",
                 f"{base}.scratch.hidden=32", f"{base}.scratch.patch_size=8", f"{base}.scratch.layers=1",
                 f"{base}.epochs=100", f"{base}.checkpoint_every=2", f"{base}.max_steps={max_steps}"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_pairs(root / "train", 32, 0), write_pairs(root / "val", 16, 1)


@pytest.fixture(scope="module")
def first(s3, data):
    assert finetune(s3, data, max_steps=4) == 0
    return keys(s3["client"], PREFIX)


def test_finetune_writes_the_model_and_a_checkpoint_to_s3(s3, first):
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "preprocessor_config.json",
                 "training.json", "checkpoints/latest", "checkpoints/step_00000004/model.safetensors",
                 "checkpoints/step_00000004/trainer_state.pt"):
        assert name in first
    assert get(s3["client"], PREFIX + "checkpoints/latest").decode() == "step_00000004"
    assert not [k for k in first if is_temporary(k.rsplit("/", 1)[-1])]
    history = json.loads(get(s3["client"], PREFIX + "training.json"))["history"]
    assert history[-1]["step"] == 4


def test_rerun_resumes_from_the_checkpoint_on_s3(s3, first, data, monkeypatch):
    started = []
    original = trainer_module.Trainer.fit

    def record(self, progress=True):
        started.append(self.state["step"])
        return original(self, progress)

    monkeypatch.setattr(trainer_module.Trainer, "fit", record)
    assert finetune(s3, data, max_steps=6) == 0
    assert started == [4]  # resumed at the checkpoint's step, not from 0
    names = keys(s3["client"], PREFIX)
    assert get(s3["client"], PREFIX + "checkpoints/latest").decode() == "step_00000006"
    assert sorted({n.split("/")[1] for n in names if n.startswith("checkpoints/step_")}) == \
        ["step_00000004", "step_00000006"]  # the last two are kept
    assert json.loads(get(s3["client"], PREFIX + "training.json"))["history"][-1]["step"] == 6


def test_the_model_on_s3_loads_like_a_local_one(s3, first):
    """The loader takes local folders (and hub ids): the model is downloaded first."""
    import torch
    from safetensors.torch import load as load_safetensors
    from transformers import BlipForConditionalGeneration

    from capfilt.models.loading import load_blip

    with local_copy(OUTPUT) as local:
        loaded = load_blip(BlipForConditionalGeneration, local, None, "cpu", "float32")
    saved = load_safetensors(get(s3["client"], PREFIX + "model.safetensors"))
    own = loaded.model.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    assert loaded.image_processor.size == {"height": 32, "width": 32}
    assert loaded.tokenizer("a picture of").input_ids
