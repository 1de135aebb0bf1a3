"""The Train tab's caption table shows each image's bucket at the typed resolution, in the family's bucket
steps, as training picks it (on a 32 px run on the tiny Flux it read 1120x928, the native size's bucket)."""

from __future__ import annotations

from conftest import draw_concept
from tiny_transformers import tiny_flux_model  # noqa: F401 - fixture

from sdlora.config import DataConfig
from sdlora.training.buckets import bucket_step
from sdlora.training.data import load_concept_images
from sdlora.ui.studio import Studio
from sdlora.ui.train_handlers import TrainHandlers


def test_the_bucket_column_follows_the_typed_resolution(tiny_flux_model, tmp_path):  # noqa: F811
    folder = tmp_path / "concept"
    folder.mkdir()
    images = [str(draw_concept(folder / f"img{i}.png", i)) for i in range(2)]  # 48x40: not square
    studio = Studio(
        str(tiny_flux_model), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "w"
    )
    handlers = TrainHandlers(studio)
    _, table = handlers.show_images(images, 32)
    # What the training loop itself picks at 32 px, with the family's step.
    generator = studio.generator()
    step = bucket_step(
        generator.pipeline.vae_scale_factor, generator.model_info.model_family.bucket_latent_step
    )
    trained = load_concept_images(DataConfig(images=str(folder), resolution=32), None, bucket_step=step)
    assert list(table["bucket"]) == [str(c.placement.bucket) for c in trained.images]
    assert all(int(side) <= 64 for bucket in table["bucket"] for side in bucket.split("x"))
