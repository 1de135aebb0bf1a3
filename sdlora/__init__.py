"""sdlora: train Stable Diffusion LoRA adapters and use them.

The engine in this package never imports gradio; `app.py` is a thin UI over it.
"""

__version__ = "0.1.0"
