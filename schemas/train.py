"""The training spec: what SED trains on, with which recipe, where checkpoints go, on what Ray.

Validated like the job spec (`extra="forbid"`); the recipe's defaults are the paper's (COCO-Stuff,
80k iterations at batch 4 on 4 GPUs). Exported to `schemas/train.schema.json` by
`python -m schemas.export`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .job import ModelSpec, RaySpec, TaxonomySpec, _Spec

TRAIN_SPEC_VERSION = 1


class TrainDataSpec(_Spec):
    url: str = Field(
        description="fsspec URL of a folder with images/ and labels/ (label maps: PNGs of class ids, 255 = ignore, "
        "with the image's file stem), or of a benchmark folder written by `sed-label prepare` (see dataset)"
    )
    dataset: str | None = Field(
        None,
        description="the benchmark url holds, as prepared by `sed-label prepare NAME` (coco-stuff-171 is the paper's "
        "training set); its classes are the taxonomy unless one is given; null = a folder of images/ and labels/",
    )
    split: str | None = Field(
        None,
        description="prepared datasets only: the split url must hold (its manifest says which it is); default: for data "
        "the benchmark's training split (train2017 of coco-stuff-171; name the split to train on a benchmark that has "
        "only evaluation splits), for validation its evaluation split",
    )
    images_dir: str = Field("images", description="folder of the images under url (folders only)")
    labels_dir: str = Field("labels", description="folder of the label maps under url (folders only)")
    ignore_label: int = Field(255, ge=0, description="the id of unlabelled pixels (folders only; 16-bit PNGs allow more than 255 classes)")
    limit: int | None = Field(None, ge=1, description="use only the first N images (sorted by name)")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _folders_only_without_dataset(self) -> "TrainDataSpec":
        if self.dataset is not None and {"images_dir", "labels_dir", "ignore_label"} & self.model_fields_set:
            raise ValueError("images_dir, labels_dir and ignore_label apply to folders; a prepared dataset knows its own")
        if self.dataset is None and self.split is not None:
            raise ValueError("split applies to prepared datasets (dataset), not to folders")
        return self


class ValidationSpec(TrainDataSpec):
    every: int = Field(1000, ge=1, description="iterations between evaluations (and one at the end)")
    top_k: int | None = Field(None, ge=1, description="early rejection while evaluating; null = exact, as the paper's main results")


class RecipeSpec(_Spec):
    lr: float = Field(2e-4, gt=0)
    image_tower_lr_multiplier: float = Field(0.01, ge=0, description="the CLIP image tower's learning rate, relative to lr")
    weight_decay: float = Field(1e-4, ge=0, description="0 for normalisation layers and embeddings whatever this is")
    iterations: int = Field(80_000, ge=1)
    batch_size: int = Field(4, ge=1, description="images per iteration over all workers together")
    clip_grad_norm: float = Field(0.01, gt=0, description="total L2 norm of all trained gradients")
    crop: int = Field(768, ge=32, description="random square crop; images are padded to a multiple of it")
    short_edge: int = Field(768, ge=32)
    max_long_edge: int = Field(2666, ge=32)
    colour: bool = Field(True, description="SSD-style colour augmentation")
    flip: bool = Field(True)
    exclude_ignored: bool = Field(False, description="leave ignored pixels out of the loss (the paper counts them as negatives)")
    seed: int = Field(0, description="data order and augmentation: a resumed run continues the same sequence")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="autocast dtype of the forward: auto = bfloat16 on GPUs that have it, float16 (with loss scaling) "
        "on older GPUs, float32 on CPU",
    )


class TrainOutputSpec(_Spec):
    url: str = Field(description="fsspec URL: checkpoints/, the resumable state and metrics.jsonl go here")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    checkpoint_every: int = Field(1000, ge=1, description="iterations between checkpoints (and one at the end)")
    tensorboard: bool = Field(True, description="also write TensorBoard event files to tensorboard/ (when the tensorboard package is installed)")


class TrainScalingSpec(_Spec):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker, mixed precision")
    cpus_per_worker: float = Field(1, gt=0)


class TrainSpec(_Spec):
    version: Literal[1] = TRAIN_SPEC_VERSION
    data: TrainDataSpec
    taxonomy: TaxonomySpec | None = Field(
        None, description="the class names in label-id order; may be left out when data.dataset names a prepared benchmark"
    )
    validation: ValidationSpec | None = Field(None, description="labelled images evaluated (mIoU) during training, in the same ids")
    model: ModelSpec
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    output: TrainOutputSpec
    scaling: TrainScalingSpec = Field(default_factory=TrainScalingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _taxonomy_known(self) -> "TrainSpec":
        if self.taxonomy is None and self.data.dataset is None:
            raise ValueError("taxonomy is required unless data.dataset names a prepared benchmark (whose classes it has)")
        return self

    @model_validator(mode="after")
    def _batch_divides_over_workers(self) -> "TrainSpec":
        if self.recipe.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"recipe.batch_size {self.recipe.batch_size} is not divisible by scaling.num_workers {self.scaling.num_workers}"
            )
        return self
