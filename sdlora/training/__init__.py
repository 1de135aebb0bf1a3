"""Training a LoRA: the loop and what it stands on (data, buckets, encoding, checkpoints, previews, presets)."""
