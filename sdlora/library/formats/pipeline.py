"""Put an Adapter into a loaded diffusers pipeline through diffusers' own loaders.

The tensors go in under PEFT keys with peft's LoraConfig per part, the route on which
diffusers applies every layer's own alpha. (Its kohya route gets text-encoder alphas wrong
on transformers 5: the weights lose 'text_model.' but the alphas keep it; docs/formats.md.)
"""

from __future__ import annotations

import inspect

from sdlora.library.formats.adapter import Adapter
from sdlora.library.formats.names import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from sdlora.library.formats.transformer_names import TRANSFORMER
from sdlora.library.formats.write import diffusers_tensors, peft_configs


def load_into_pipeline(pipeline, adapter: Adapter, adapter_name: str) -> None:
    """Attach `adapter` to the pipeline's denoiser and text encoders as peft adapter `adapter_name`."""
    tensors = diffusers_tensors(adapter)
    configs = peft_configs(adapter)
    for part, config in configs.items():
        metadata = {f"{part}.{name}": value for name, value in config.items()}
        part_tensors = {k: v for k, v in tensors.items() if k.startswith(part + ".")}
        if part == UNET:
            pipeline.load_lora_into_unet(
                part_tensors,
                network_alphas=None,
                unet=pipeline.unet,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=pipeline,
            )
        elif part == TRANSFORMER:  # SD3.5, Flux.1 (Flux's loader also takes kohya-style alphas: none here)
            loader = pipeline.load_lora_into_transformer
            takes_alphas = "network_alphas" in inspect.signature(loader).parameters
            loader(
                part_tensors,
                transformer=pipeline.transformer,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=pipeline,
                **({"network_alphas": None} if takes_alphas else {}),
            )
        elif part in (TEXT_ENCODER, TEXT_ENCODER_2):
            pipeline.load_lora_into_text_encoder(
                part_tensors,
                network_alphas=None,
                text_encoder=getattr(pipeline, part),
                prefix=part,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=pipeline,
            )
