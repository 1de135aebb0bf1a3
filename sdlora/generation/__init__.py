"""Generation: one resident base model, adapter mixes, batched requests, grids."""
