"""The adapter toolbox: resize, merge, extract, bake and block weights, over the one in-memory adapter form."""
