"""Fine-tuning BLIP's captioner (LM) and filter (ITC + ITM) on clean image-text pairs."""
