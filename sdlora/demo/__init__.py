"""The embedded demo model: a tiny Stable Diffusion trained on procedural shapes.

`shapes` draws the images, `evaluate` reads them back, `build` trains the model
and `report` measures it.
"""
