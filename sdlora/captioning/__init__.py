"""Captions for concept images: the captioner interface and the captioners."""
