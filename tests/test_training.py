"""capfilt finetune: the loss falls, the filter learns, checkpoints resume and load in capfilt run."""

import json
import os
import random

import pytest
import torch
import webdataset as wds

from capfilt.config import load_config
from capfilt.training.trainer import finetune
from pipelines import world


def write_pairs(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with wds.TarWriter(str(folder / "00000.tar"), encoder=False) as tar:
        for i in range(n):
            scene = world.random_scene(rng)
            tar.write({"__key__": f"{i:06d}", "jpg": scene.jpeg(32), "txt": scene.caption().encode()})
    (folder / "00000_stats.json").write_text(json.dumps({"successes": n}))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_pairs(root / "train", 512, 0), write_pairs(root / "val", 128, 1)


def train_cfg(kind, data, output, *extra):
    base = f"finetune.{kind}"
    return getattr(load_config(None, [
        f"{base}.train={data[0]}", f"{base}.val={data[1]}", f"{base}.output={output}",
        f"{base}.image_size=32", f"{base}.batch_size=32", f"{base}.lr=2e-3", f"{base}.warmup_steps=5",
        f"{base}.scratch.hidden=64", f"{base}.scratch.patch_size=8", f"{base}.epochs=100",
        f"{base}.checkpoint_every=10", *extra]).finetune, kind)


def history(path):
    return json.load(open(os.path.join(path, "training.json")))["history"]


@pytest.fixture(scope="module")
def captioner(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "captioner"
    return finetune("captioner", train_cfg("captioner", data, out, "finetune.captioner.max_steps=48"),
                    progress=False)


def test_captioner_loss_falls_and_token_accuracy_rises(captioner):
    epochs = history(captioner)
    assert len(epochs) == 3  # 16 steps per epoch
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] * 0.8
    assert epochs[-1]["val_token_accuracy"] > epochs[0]["val_token_accuracy"]
    assert epochs[-1]["val_token_accuracy"] > 0.4


def test_filter_from_the_captioner_beats_chance(captioner, data, tmp_path):
    cfg = train_cfg("filter", data, tmp_path / "filter", f"finetune.filter.init={captioner}",
                    "finetune.filter.max_steps=160", "finetune.filter.itm_positive_weight=2")
    path = finetune("filter", cfg, progress=False)
    epochs = history(path)
    assert max(e["val_itm_accuracy"] for e in epochs) > 0.6  # balanced: chance is 0.5
    assert max(max(e["val_i2t_r1"], e["val_t2i_r1"]) for e in epochs) > 3 / 128  # chance is 1/128


def test_resume_continues_from_the_checkpoint_step(data, tmp_path):
    out = tmp_path / "captioner"

    class Stop(Exception):
        pass

    cfg = train_cfg("captioner", data, out, "finetune.captioner.max_steps=20")
    from capfilt.training import trainer as trainer_module

    original = trainer_module.Trainer.save_checkpoint
    calls = []

    def save_then_die(self):
        path = original(self)
        calls.append(self.state["step"])
        if self.state["step"] == 10:
            raise Stop
        return path

    trainer_module.Trainer.save_checkpoint = save_then_die
    try:
        with pytest.raises(Stop):
            finetune("captioner", cfg, progress=False)
    finally:
        trainer_module.Trainer.save_checkpoint = original
    assert open(out / "checkpoints" / "latest").read().strip() == "step_00000010"
    resumed = []
    original_epoch = trainer_module.Trainer._epoch

    def record(self, bar):
        resumed.append((self.state["step"], self.state["step_in_epoch"]))
        return original_epoch(self, bar)

    trainer_module.Trainer._epoch = record
    try:
        path = finetune("captioner", cfg, progress=False)
    finally:
        trainer_module.Trainer._epoch = original_epoch
    assert resumed[0] == (10, 10)  # continued mid-epoch at step 10, not from 0
    assert history(path)[-1]["step"] == 20


def test_finetuned_checkpoints_load_through_capfilt_run(captioner, data, tmp_path):
    from pipelines.cli import main

    # A filter trained for a few steps is enough to check the loading path.
    cfg = train_cfg("filter", data, tmp_path / "filter", f"finetune.filter.init={captioner}",
                    "finetune.filter.max_steps=2")
    itm = finetune("filter", cfg, progress=False)
    # It records the ITM first token it was trained with; run scores with it (filter.first_token: auto).
    from capfilt.models.loading import ITM_FIRST_TOKEN_KEY

    assert json.load(open(os.path.join(itm, "config.json")))[ITM_FIRST_TOKEN_KEY] == "enc"
    out = tmp_path / "out"
    rc = main(["run", "--config", "configs/tiny.yaml", "--input", os.path.join(data[1], "00000.tar"),
               "--output", str(out), "--no-progress", f"captioner.model={captioner}",
               f"filter.model={itm}", "captioner.num_captions=2"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 128 and stats["error"] == 0


def test_world_ground_truth_matches_the_rendered_pixels():
    rng = random.Random(3)
    for _ in range(20):
        scene = world.random_scene(rng)
        image = scene.render(64)
        for shape in scene.shapes:
            x = int(world.POSITIONS[shape.position] * 64)
            assert image.getpixel((x, 32 + 4)) == world.COLOURS[shape.colour], scene.caption()
        for name, x in world.POSITIONS.items():
            if name not in {s.position for s in scene.shapes}:
                assert image.getpixel((int(x * 64), 32)) == world.BACKGROUND
        assert world.is_true_of(scene.caption(), scene)
        assert world.change_attribute(scene, rng) != scene.caption()


def test_flipped_captions_swap_left_and_right():
    from capfilt.training.data import swap_left_right

    assert swap_left_right("a red circle on the left and a blue square on the Right") == \
        "a red circle on the right and a blue square on the Left"
    assert swap_left_right("leftover bright") == "leftover bright"


def test_scratch_tokenizer_knows_the_prompt_words(captioner):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(captioner)
    assert tokenizer.tokenize("a picture of ") == ["a", "picture", "of"]


def itm_and_itc_first_ids(task, texts):
    """The first token id of every text the text encoder reads in one loss step, for ITM
    (with the image: encoder_hidden_states given) and for ITC (without)."""
    seen = {"itm": set(), "itc": set()}

    def spy(module, args, kwargs):
        kind = "itm" if kwargs.get("encoder_hidden_states") is not None else "itc"
        seen[kind].update(kwargs["input_ids"][:, 0].tolist())

    handle = task.model.text_encoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        task.loss(torch.randn(len(texts), 3, 64, 64), texts, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("first_token", ["auto", "cls"])
def test_filter_trains_itm_with_the_first_token_and_records_it(tiny_models, first_token):
    """As BLIP's blip_retrieval.py: ITM reads [ENC] in place of [CLS] (auto, as nothing is
    recorded in the starting checkpoint), ITC reads [CLS]; the model's config, which every
    checkpoint saved of it carries, records the token."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from capfilt.config import TrainConfig
    from capfilt.models.loading import ITM_FIRST_TOKEN_KEY
    from capfilt.training.tasks import FilterTask

    model = BlipForImageTextRetrieval.from_pretrained(tiny_models[1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    task = FilterTask(model, tokenizer, TrainConfig(init=tiny_models[1]), first_token)
    seen = itm_and_itc_first_ids(task, ["a red square", "a blue circle", "a green triangle"])
    expected = "[ENC]" if first_token == "auto" else "[CLS]"
    assert seen == {"itm": {tokenizer.convert_tokens_to_ids(expected)}, "itc": {tokenizer.cls_token_id}}
    assert getattr(model.config, ITM_FIRST_TOKEN_KEY) == {"auto": "enc", "cls": "cls"}[first_token]


def test_retrieval_hits_are_on_the_similarities_device():
    """R@1's match table is indexed by an argmax of the similarities: it must live on their
    device (a CPU table indexed by a CUDA argmax raises). On the meta device here, where a
    CPU table silently gives a CPU answer."""
    from capfilt.training.tasks import _top1_hits

    texts = ["a", "b", "a", "c"]
    sims = torch.eye(4)
    sims[0, 1] = 2.0  # image 0's top text is b: a miss
    i2t, t2i = _top1_hits(sims, texts)
    assert i2t.tolist() == [False, True, True, True] and t2i.tolist() == [True, False, True, True]
    assert all(h.device.type == "meta" for h in _top1_hits(sims.to("meta"), texts))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_puts_the_optimizer_state_on_the_parameters_device(data, tmp_path):
    """A resumed optimizer state is on the training device, with its parameters (on a GPU,
    AdamW's step fails on state left on the CPU). The meta device stands in for a GPU here."""
    from transformers import BlipForImageTextRetrieval

    from capfilt.io.fs import expand_input
    from capfilt.training.tasks import FilterTask
    from capfilt.training.trainer import Trainer, build_model

    cfg = train_cfg("filter", data, tmp_path / "filter", "finetune.filter.max_steps=1", "finetune.filter.val=null")
    finetune("filter", cfg, progress=False)
    model, tokenizer, mean, std, _ = build_model(BlipForImageTextRetrieval, cfg, expand_input(cfg.train),
                                                 "a picture of ")
    trainer = Trainer(FilterTask(model, tokenizer, cfg), cfg, tokenizer, mean, std, "meta")
    assert trainer.resume()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(trainer.optimizer.state) == len(params)
    for p in params:
        assert p.device.type == "meta"
        state = trainer.optimizer.state[p]
        assert {k: v.device.type for k, v in state.items() if k != "step"} == {"exp_avg": "meta", "exp_avg_sq": "meta"}
    assert trainer.task.extra_parameters["temp"] is params[-1]
