"""The fine-tuning loop: AdamW + cosine schedule, periodic checkpoints, resume, metrics per epoch."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Callable
from typing import Any

import torch

from capfilt.config import TrainConfig
from capfilt.io.fs import OutputDir, exists, expand_input, local_copy
from capfilt.models.loading import (by_module, check_checkpoint, check_loads_whole, load_image_processor,
                                    resolve_device)
from capfilt.runtime.progress import bar_interval
from capfilt.training.data import ImageTransform, batches, count_pairs, iter_pairs, shuffled_pairs

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def vocabulary(urls: list[str]) -> list[str]:
    """The words of the training texts, for a tokenizer built from scratch."""
    words: set[str] = set()
    for pair in iter_pairs(urls):
        words.update(re.findall(r"[a-z0-9]+", pair.text.lower()))
    return sorted(words)


def build_model(model_cls, cfg: TrainConfig, train_urls: list[str], prompt: str = ""):
    """(model, tokenizer, mean, std, note): from ``cfg.init``, or from scratch with ``cfg.scratch``
    and a tokenizer of the training texts' words and the prompt's (a prompt spelled out in
    single characters would take most of BLIP's 20-token caption length). ``note``: what a filter
    started from a captioner checkpoint reuses and starts fresh, else empty."""
    from transformers import AutoTokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    note = ""  # what a partial start reuses and starts fresh
    if cfg.init:
        from transformers.utils import logging as hf_logging

        # A filter started from a captioner checkpoint reuses its vision encoder; the rest
        # is new, which transformers reports as a long table of missing keys.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = model_cls.from_pretrained(cfg.init, use_safetensors=True, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        shared = _share_captioner_text_weights(model, cfg.init)
        fresh = sorted(set(info.get("missing_keys") or []) - {f"text_encoder.{n}" for n in shared})
        if fresh:  # only a filter started from a captioner gets here (finetune checked the rest)
            reused = [k for k in model.state_dict() if k not in fresh]
            note = (f"{cfg.init} is a captioner checkpoint: the filter reuses {by_module(reused)} (the text "
                    f"encoder from the captioner's decoder) and starts {by_module(fresh)} fresh")
        tokenizer = AutoTokenizer.from_pretrained(cfg.init)
        processor = load_image_processor(BlipImageProcessorPil, cfg.init, model.config, {})
        return model, tokenizer, processor.image_mean, processor.image_std, note
    from capfilt.models.tiny import build_tokenizer, tiny_config

    words = sorted(set(vocabulary(train_urls)) | set(re.findall(r"[a-z0-9]+", prompt.lower())))
    tokenizer = build_tokenizer(words)
    shape = cfg.scratch
    config = tiny_config(tokenizer, image_size=cfg.image_size, patch_size=shape.patch_size,
                         hidden=shape.hidden, layers=shape.layers, heads=shape.heads)
    torch.manual_seed(cfg.seed)
    return model_cls(config), tokenizer, CLIP_MEAN, CLIP_STD, ""


def _share_captioner_text_weights(model, init: str) -> list[str]:
    """A filter started from a captioner: its text encoder starts from the captioner's decoder.

    In BLIP the encoder and decoder share embeddings, cross-attention and feed-forward
    layers, and both come from one pretrained model; starting here keeps the word and
    image grounding the captioner learned. A no-op for any other checkpoint.
    """
    from safetensors import safe_open

    if not hasattr(model, "text_encoder"):
        return []
    path = os.path.join(init, "model.safetensors")
    if not exists(path):
        return []
    prefix = "text_decoder.bert."
    own = model.text_encoder.state_dict()
    shared = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            name = key[len(prefix):]
            if key.startswith(prefix) and name in own and list(own[name].shape) == f.get_slice(key).get_shape():
                shared[name] = f.get_tensor(key)
    if shared:
        model.text_encoder.load_state_dict(shared, strict=False)
        log.info("text encoder: %d tensors from the captioner's decoder in %s", len(shared), init)
    return sorted(shared)


def cosine_schedule(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    def __init__(self, task, cfg: TrainConfig, tokenizer, mean, std, device: str):
        self.task, self.cfg, self.tokenizer, self.device = task, cfg, tokenizer, device
        self.train_urls = expand_input(cfg.train)
        self.val_urls = expand_input(cfg.val) if cfg.val else []
        self.transform = ImageTransform(cfg.image_size, mean, std, cfg.crop_scale, cfg.hflip)
        self.eval_transform = ImageTransform(cfg.image_size, mean, std)
        self.mean, self.std = mean, std
        self.steps_per_epoch = max(1, count_pairs(self.train_urls) // cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        # On the device before the optimizer exists: a resumed optimizer state is moved to
        # where its parameters are when it is loaded, and stays there.
        task.model.to(device)
        for key, p in task.extra_parameters.items():
            task.extra_parameters[key] = torch.nn.Parameter(p.detach().to(device), p.requires_grad)
        params = list(task.model.parameters()) + list(task.extra_parameters.values())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self.state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "history": []}

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str:
        return posixpath.join(str(self.cfg.output).rstrip("/"), CHECKPOINTS)

    def save_checkpoint(self) -> str:
        """Save ``checkpoints/step_N`` (on any filesystem), then ``checkpoints/latest`` naming it.

        ``latest`` is written last, so it only ever names a complete checkpoint.
        """
        name = f"step_{self.state['step']:08d}"
        checkpoints = OutputDir(self.checkpoint_dir)
        final = posixpath.join(checkpoints.url, name)
        with OutputDir(final).write_folder() as local:
            self.task.model.save_pretrained(local, safe_serialization=True)
            torch.save({
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "extra": {k: v.detach().cpu() for k, v in self.task.extra_parameters.items()},
                "state": self.state,
            }, os.path.join(local, "trainer_state.pt"))
        checkpoints.write_bytes("latest", name.encode())
        for old in [n for n in checkpoints.listdir() if n.startswith("step_")][:-2]:
            checkpoints.remove_folder(old)
        return final

    def resume(self) -> bool:
        """Load the latest checkpoint of ``cfg.output`` (on any filesystem) if there is one."""
        checkpoints = OutputDir(self.checkpoint_dir)
        if not checkpoints.exists("latest"):
            return False
        path = posixpath.join(checkpoints.url, checkpoints.read_text("latest").strip())
        from safetensors.torch import load_file

        with local_copy(path) as local:
            weights = load_file(os.path.join(local, "model.safetensors"))
            saved = torch.load(os.path.join(local, "trainer_state.pt"), weights_only=True)
        self._check_same_model(weights, path)
        self.task.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        for key, value in saved["extra"].items():
            self.task.extra_parameters[key].data.copy_(value)
        self.state = saved["state"]
        log.info("resumed %s from %s (step %d)", self.task.name, path, self.state["step"])
        return True

    def _check_same_model(self, weights: dict[str, torch.Tensor], path: str) -> None:
        """A checkpoint of another model shape (say, ``init`` changed between runs) cannot resume."""
        own = self.task.model.state_dict()
        other = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
        if other:
            raise ValueError(f"{self.cfg.output} holds checkpoints of a model of another shape ({other[0]} is "
                             f"{tuple(weights[other[0]].shape)} in {path}, {tuple(own[other[0]].shape)} here): "
                             "was 'init' or 'scratch' changed? Give another output, or remove "
                             f"{self.checkpoint_dir} to start again")

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        self.task.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state["step"], unit="step",
                   desc=f"finetune {self.task.name}", disable=not progress, dynamic_ncols=True,
                   mininterval=bar_interval())
        try:
            while self.state["epoch"] < self.cfg.epochs and self.state["step"] < self.total_steps:
                self._epoch(bar)
        finally:
            bar.close()
        self.save_checkpoint()
        return self.state

    def _epoch(self, bar) -> None:
        cfg, state = self.cfg, self.state
        epoch = state["epoch"]
        pairs = shuffled_pairs(self.train_urls, cfg.seed, epoch, cfg.shuffle_buffer)
        for pixels, texts in batches(pairs, self.transform, cfg.batch_size, f"{cfg.seed}/{epoch}",
                                     skip=state["step_in_epoch"]):
            if state["step"] >= self.total_steps:
                break
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"])
            loss, logs = self.task.loss(torch.from_numpy(pixels).to(self.device), texts, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()}, refresh=False)
            if state["step"] % cfg.log_every == 0:
                log.info("%s step %d: %s", self.task.name, state["step"], logs)
            if state["step"] % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        metrics = self.evaluate() if state["step_in_epoch"] else {}
        state["history"].append({"epoch": epoch, "step": state["step"], **metrics})
        if metrics:
            bar.write(f"{self.task.name} epoch {epoch}: " +
                      ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        self.save_checkpoint()

    def evaluate(self) -> dict[str, float]:
        if self.cfg.eval and self.task.name == "filter":
            return self.retrieval()
        if not self.val_urls:
            return {}
        self.task.model.eval()
        try:
            val = ((torch.from_numpy(p).to(self.device), t) for p, t in
                   batches(iter_pairs(self.val_urls), self.eval_transform, self.cfg.batch_size, None))
            return self.task.evaluate(val)
        finally:
            self.task.model.train()

    def retrieval(self) -> dict[str, float]:
        """``capfilt evaluate`` on ``cfg.eval`` of the model as it is now, saved as ``save`` saves
        it to a temporary folder and loaded back as ``capfilt evaluate`` loads a checkpoint."""
        import tempfile

        from capfilt.config import load_config
        from capfilt.evaluate import evaluate

        try:
            with tempfile.TemporaryDirectory() as folder:
                self.save_model(folder)
                config = load_config(None, [f"filter.model={folder}", f"runtime.device={self.device}",
                                            "runtime.dtype=float32"])
                found = evaluate(expand_input(self.cfg.eval), config)["retrieval"]
        finally:
            self.task.model.train()
        return {"val_txt_r1": found["txt_r1"], "val_img_r1": found["img_r1"], "val_r_mean": found["r_mean"]}

    def save_model(self, local: str) -> None:
        """The model, its tokenizer and image processor, in a local folder."""
        from capfilt.models.tiny import save_checkpoint

        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        self.task.model.eval()
        size = self.cfg.image_size
        save_checkpoint(self.task.model, self.tokenizer, size, local)
        BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(self.mean),
                              image_std=list(self.std)).save_pretrained(local)

    def save(self) -> str:
        """The fine-tuned checkpoint, as ``capfilt run`` loads it."""
        out = OutputDir(str(self.cfg.output))
        with out.write_folder() as local:
            self.save_model(local)
        record = {"config": _asdict(self.cfg), "history": self.state["history"]}
        out.write_bytes("training.json", json.dumps(record, indent=2).encode())  # last: the model is complete
        return out.url


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def finetune(kind: str, cfg: TrainConfig, prompt: str = "a picture of ", progress: bool = True,
             first_token: str = "auto") -> str:
    """Fine-tune (or train from scratch) a captioner or a filter; return the saved folder.
    ``first_token`` is the filter's ITM first token (``filter.first_token``), recorded in it."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    from capfilt.training.tasks import CaptionerTask, FilterTask

    if not cfg.train or not cfg.output:
        raise ValueError(f"finetune.{kind}: 'train' and 'output' are required")
    hf_logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model_cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    if cfg.init:
        checkpoint = check_checkpoint(f"finetune.{kind}.init", cfg.init)
        # The one documented partial start: a filter from a captioner (build_model says what it reuses).
        if not (kind == "filter" and "BlipForConditionalGeneration" in (checkpoint.get("architectures") or [])):
            check_loads_whole(f"finetune.{kind}.init", cfg.init, None, model_cls, checkpoint)
    model, tokenizer, mean, std, note = build_model(model_cls, cfg, expand_input(cfg.train), prompt)
    if model.config.vision_config.image_size != cfg.image_size:
        raise ValueError(f"finetune.{kind}.image_size is {cfg.image_size} but {cfg.init} was trained at "
                         f"{model.config.vision_config.image_size}; set image_size to that")
    task = (CaptionerTask(model, tokenizer, cfg, prompt) if kind == "captioner"
            else FilterTask(model, tokenizer, cfg, first_token))
    trainer = Trainer(task, cfg, tokenizer, mean, std, device)
    trainer.resume()
    if note and trainer.state["step"] == 0:  # a fresh start from a partial checkpoint: say what it is
        log.warning("%s", note)
    trainer.fit(progress=progress)
    return trainer.save()
