"""``capfilt finetune captioner|filter``: fine-tune BLIP on clean pairs, save for ``capfilt run``."""

from __future__ import annotations

from capfilt.config import Config


def run(config: Config, kind: str, progress: bool = True) -> str:
    from capfilt.io.fs import configure_storage
    from capfilt.training.trainer import finetune

    configure_storage(config.storage_options)  # the output (and its checkpoints) may be on s3://
    cfg = getattr(config.finetune, kind)
    path = finetune(kind, cfg, prompt=config.captioner.prompt, progress=progress)
    print(f"capfilt: fine-tuned {kind} saved to {path} (use it as {kind}.model)")
    return path
