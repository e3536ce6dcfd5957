"""BLIP models: the captioner, the ITM filter, and tiny local checkpoints for tests."""
