"""What a model family is: everything that differs between kinds of base model, in one object.

A family is recognised from its configs, named in the user's words and in the ids other tools
write (kohya, modelspec), loaded with its pipeline class, turns captions into conditioning, and
says how a batch is noised, what the denoiser should answer and how it is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sdlora.config import ATTENTION_PROJECTIONS

if TYPE_CHECKING:
    import torch

    from sdlora.config import TrainConfig
    from sdlora.training.encode import Batch


@dataclass(frozen=True)
class Noised:
    """A batch after the forward process: what the denoiser sees, and what it should answer."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class Objective(Protocol):
    """How a family trains: noise a batch, call the denoiser, weight each sample's loss."""

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> Noised: ...

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, fractions: torch.Tensor) -> Noised: ...

    def predict(self, denoiser: Any, noised: Noised, batch: Batch) -> torch.Tensor: ...

    def weights(self, noised: Noised) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class SamplingDefaults:
    """What a drawing on a model uses where the user sets nothing: steps, guidance, and its samplers."""

    steps: int
    guidance: float
    samplers: tuple[str, ...]  # the samplers that suit the model, its default first
    guidance_used: bool = True  # False: the model ignores guidance (a timestep-distilled one)
    negative_prompt_used: bool = True  # False: the pipeline draws without a negative prompt

    @property
    def passes_per_step(self) -> int:
        """Denoiser passes per sampling step: with and without the prompt (classifier-free guidance), or one
        where the pipeline takes no negative prompt (Flux.1: its guidance is an input, not a second pass)."""
        return 2 if self.negative_prompt_used else 1


@dataclass(frozen=True)
class Family:
    """One kind of base model. Subclasses (one file each) fill the fields and override the methods."""

    name: str  # stored in adapter headers (sdlora.family): never renamed
    words: str  # what a person calls it
    pipeline_classes: tuple[str, ...]  # diffusers pipeline class names (model_index.json's _class_name)
    kohya_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # modelspec.architecture of an adapter for it
    modelspec_implementation: str  # modelspec.implementation: whose layer names the kohya file uses
    kohya_text_prefixes: dict[str, str]  # text-encoder part -> kohya name prefix
    single_file_kind: str  # diffusers' infer_diffusers_model_type answer for its single files
    single_file_parts: dict[str, tuple[str, ...]]  # part a person knows -> its key prefixes in a single file
    activation_gb_per_latent_pixel: float  # training activations at batch 1, no checkpointing (the estimate)
    lora_parameters_per_rank: int  # attention-projection LoRA parameters at rank 1 (the estimate)
    # The diffusion transformers' estimate (sdlora/training/estimate.py) works from their published sizes:
    # per variant (its config folder under models/configs, parameters, attention LoRA parameters at rank 1),
    # the bytes a training step keeps per token x width x block (bf16, no checkpointing), the text tokens
    # beside the image's, and the text encoders' parameters (on the GPU while captions are cached).
    estimate_variants: tuple[tuple[str, int, int], ...] = ()
    activation_bytes_per_token_width_block: float = 0.0
    estimate_text_tokens: int = 0
    text_encoder_parameters: int = 0
    denoiser: str = "unet"  # the pipeline attribute holding the model that is trained
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS  # the denoiser layers LoraSpec adapts by default
    # Adapters for families of one layout may be tried on each other (the shapes then decide):
    # SD 1.x and 2.x name their layers alike, SDXL's are its own.
    adapter_layout: str = "sd-unet"
    kohya_v2: bool = False  # kohya's ss_v2 flag
    kohya_original_unet_names: bool = False  # kohya names UNet layers by the original (LDM) paths
    named_in_estimate: bool = False  # the estimate says which family (the costly ones)
    load_options: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments
    bucket_latent_step: int = 8  # buckets' side step in latent pixels (a transformer's: its patch size)
    prediction_type: str | None = None  # what the denoiser answers when its scheduler does not say
    own_scheduler_only: bool = False  # generation keeps the model's own sampler (flow matching has one)
    # The LoRA Block Weight convention its adapters take (sdlora/library/tools/block_weights.py).
    block_weights: str = "sd-unet"
    # Its text encoders in an original-layout single file: (part, "clip" or "open_clip", key prefix);
    # empty where bake writes no such file.
    original_text_encoders: tuple[tuple[str, str, str], ...] = ()
    # The layout of that single file (sdlora/models/original_layout.py): "ldm" (Stable Diffusion's
    # UNet, VAE and text encoders), "mmdit" (Stability's SD3.5 transformer), "bfl" (Black Forest Labs'
    # Flux.1 transformer); "" where bake writes no such file. The parts a transformer's file holds
    # (empty: every part, as an LDM checkpoint does).
    original_layout: str = ""
    original_parts: tuple[str, ...] = ()

    def recognises(self, denoiser_config: dict) -> bool:
        """Whether a denoiser config (a loaded model's or its config.json) is this family's."""
        raise NotImplementedError

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        """The side in pixels the model was trained at."""
        raise NotImplementedError

    def config_folder(self, prediction_type: str) -> str:
        """The folder under models/configs that describes its single files (modelspec architecture ids)."""
        raise NotImplementedError

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """Whether an adapter header's kohya or modelspec id says it was made for this family."""
        raise NotImplementedError

    def trained_with(self, config: TrainConfig) -> Family:
        """The family as a run with these settings trains it; a setting that means nothing for it is refused."""
        return self

    def architecture_of(self, denoiser_config: dict) -> str:
        """modelspec.architecture of an adapter for this very model (a family's variants may differ)."""
        return self.modelspec_architecture

    def prediction_from_weights(self) -> bool:
        """Whether its single files may be either epsilon or v-prediction models, told apart by weights."""
        return False

    def encode_captions(
        self, pipeline: Any, captions: list[str], time_ids: list[tuple], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Captions as the denoiser's conditioning: the embeddings, and any further inputs by name.

        `time_ids` are each image's size conditioning (original size, crop, target size)."""
        raise NotImplementedError

    def sampling_defaults(self, denoiser_config: dict) -> SamplingDefaults | None:
        """What its model's card recommends for drawing; None: GenerateConfig's defaults and every sampler."""
        return None

    def latents_for_vae(self, pipeline: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A pipeline's 'latent' output as its VAE decodes it: unscaled, unshifted, in float32."""
        config = pipeline.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return latents.float() / config.scaling_factor + shift

    def objective(
        self,
        scheduler_config: Any,
        prediction_type: str,
        min_snr_gamma: float = 0.0,
        noise_offset: float = 0.0,
    ) -> Objective:
        """How a batch is noised, what the target is and how each sample's loss is weighted."""
        raise NotImplementedError
