"""The job spec: what a labelling job reads, how it labels, where it writes, and on what Ray.

Validated with pydantic (`extra="forbid"`: an unknown field is an error naming it). The JSON Schema
is exported to `schemas/job.schema.json`; `python -m schemas.export` rewrites it and a test fails
when it is stale.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JOB_SPEC_VERSION = 1
OUTPUT_FORMATS = ("parquet", "coco", "png")
DEFAULT_MAX_PIXELS = 100_000_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Spec):
    url: str = Field(description="fsspec URL: a prefix of image files, a glob, .tar shards, or Parquet files with image bytes")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec (credentials, endpoint_url)")
    shard_size: int = Field(256, ge=1, description="images per output shard (the unit of commit and resume)")
    image_column: str = Field("image", description="Parquet inputs: the column with encoded image bytes (or a struct with 'bytes')")
    id_column: str | None = Field(None, description="Parquet inputs: a column with image ids (default: file#row)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="images with more pixels are error rows (decompression bombs)")


class PromptGroup(_Spec):
    name: str = Field(description="the output class")
    prompts: list[str] = Field(description="prompts the model scores apart (each its own class for the model); the class's probability is their maximum")

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a group's name must not be empty")
        return value

    @model_validator(mode="after")
    def _has_prompts(self) -> "PromptGroup":
        if not self.prompts:
            raise ValueError(f"group {self.name!r} has no prompts")
        return self


def class_entry(entry: str | PromptGroup | dict) -> tuple[str, list[str]]:
    """A taxonomy entry as (class name, its prompts): a plain name is its own one prompt."""
    group = PromptGroup.model_validate(entry) if isinstance(entry, dict) else entry
    return (group.name, list(group.prompts)) if isinstance(group, PromptGroup) else (group, [group])


def taxonomy_problem(classes: list[str | PromptGroup | dict], distractors: list[str]) -> str | None:
    """What is wrong with a taxonomy's structure (an empty list, a repeated class name, a prompt used
    twice, an empty prompt), or None."""
    if not classes:
        return "the taxonomy needs at least one class"
    names: set[str] = set()
    owners: dict[str, str] = {}  # prompt -> where it is used
    for entry in classes:
        name, prompts = class_entry(entry)
        if name in names:
            return f"duplicate class name {name!r}"
        names.add(name)
        for prompt in prompts:
            where = f"class {name!r}"
            problem = _prompt_problem(prompt, where, owners)
            if problem:
                return problem
    for prompt in distractors:
        problem = _prompt_problem(prompt, "the distractors", owners)
        if problem:
            return problem
    return None


def _prompt_problem(prompt: str, where: str, owners: dict[str, str]) -> str | None:
    if not isinstance(prompt, str) or not prompt.strip():
        return f"an empty prompt in {where}"
    if prompt in owners:
        return f"prompt {prompt!r} appears twice: in {owners[prompt]} and in {where}"
    owners[prompt] = where
    return None


class TaxonomySpec(_Spec):
    classes: list[str | PromptGroup] | str = Field(
        description="output classes in label order: a name (', ' separates synonyms, averaged), or {name, prompts} for a "
        "group of prompts that form one class; or a path/URL to a JSON list of those or a text file, one name per line"
    )
    distractors: list[str] = Field(
        default_factory=list, description="prompts the model scores like classes whose pixels become unlabeled (counted in distractor_area)"
    )
    templates: Literal["imagenet"] | list[str] = Field("imagenet", description="'imagenet' (the paper's 80 templates) or strings containing {}")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes_not_empty(cls, value: list[str | PromptGroup] | str) -> list[str | PromptGroup] | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty path/URL")
        return value

    @model_validator(mode="after")
    def _structure(self) -> "TaxonomySpec":
        if isinstance(self.classes, list):
            problem = taxonomy_problem(self.classes, self.distractors)
            if problem:
                raise ValueError(problem)
        return self

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("templates must not be empty")
            for i, template in enumerate(value):
                if "{}" not in template:
                    raise ValueError(f"template {i} {template!r} has no '{{}}' for the class name")
        return value


class ModelSpec(_Spec):
    clip_model: str | dict[str, Any] = Field("convnext_b", description="preset name (convnext_b, convnext_l), OpenCLIP architecture name, or OpenCLIP config dict")
    weights: str | None = Field(description="SED checkpoint path/URL (.pth as released, or .safetensors); null = random weights (demo only: meaningless labels)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for reading the weights")
    seed: int = Field(0, description="seed of the random weights when weights is null")
    image_size: int = Field(
        768, ge=32, multiple_of=32, description="side of the square the model sees (768 as in the paper); smaller is faster and coarser"
    )
    clip_weights: str | None = Field(
        None,
        description="with weights null: OpenCLIP weights for the CLIP part, where the paper's training starts ('pretrained' = "
        "the preset's tag, another OpenCLIP tag (downloaded), or a path/URL of an OpenCLIP checkpoint); the decoder stays random",
    )

    @model_validator(mode="after")
    def _clip_weights_only_without_checkpoint(self) -> "ModelSpec":
        if self.clip_weights is not None and self.weights is not None:
            raise ValueError("clip_weights applies only when weights is null: an SED checkpoint holds its own CLIP weights")
        return self


class TilingSpec(_Spec):
    """Large images labelled by overlapping windows at (a set scale of) their own resolution."""

    window: int = Field(768, ge=32, multiple_of=4, description="window side in pixels at `scale` (the model's input size is best)")
    overlap: float = Field(0.25, ge=0.0, le=0.75, description="share of a window its neighbours overlap")
    min_side: int = Field(1536, ge=32, description="images whose short side exceeds this are tiled; the others take the protocol's resize")
    scale: float = Field(1.0, gt=0.0, le=1.0, description="the tiled image's scale: 1.0 = native pixels, 0.5 = half")

    @model_validator(mode="after")
    def _windows_fit(self) -> "TilingSpec":
        if self.min_side * self.scale < self.window:
            raise ValueError(f"tiling.min_side x scale ({self.min_side} x {self.scale}) must be at least the window ({self.window})")
        return self


class InferenceSpec(_Spec):
    top_k: int | None = Field(8, ge=1, description="category early rejection (the paper's fast mode uses 8); null = exact")
    batch_size: int = Field(4, ge=1, description="images per model call")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="pixels whose best probability is lower become unlabeled")
    short_edge: int | None = Field(640, ge=32, description="resize to this short side first, as the paper evaluates; null = feed as is")
    max_size: int = Field(2560, ge=32, description="cap on the long side of that resize")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when the actor has a GPU")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16 is faster where the hardware has it natively (GPUs; CPUs with AVX512-BF16 or AMX); its labels can "
        "differ from float32's on a few pixels. auto = bfloat16 where native, else float32 (each actor decides for its device)",
    )
    tiling: TilingSpec | None = Field(None, description="label large images by overlapping windows instead of shrinking them; null = off")


class OutputSpec(_Spec):
    url: str = Field(description="fsspec URL of the output folder")
    formats: list[Literal["parquet", "coco", "png", "confidence"]] = Field(
        default_factory=lambda: ["parquet", "coco"],
        description="parquet (always: the record), coco, png (label maps), confidence (uint8 PNGs of each pixel's margin "
        "between its best two classes, x255)",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    merge_coco: Literal["auto"] | bool = Field(
        "auto",
        description="also write one labels.coco.json for the whole job (built by a task from the shards' coco/*.json); "
        "auto = up to 100,000 images, above which the merged file would be gigabytes that COCO readers load whole",
    )

    @field_validator("formats")
    @classmethod
    def _parquet_is_the_record(cls, value: list[str]) -> list[str]:
        if "parquet" not in value:
            raise ValueError("'parquet' must be among the formats: it is the job's record (resume and reports read it)")
        return list(dict.fromkeys(value))


class ActorRange(_Spec):
    min: int = Field(1, ge=1, description="actors kept while the job runs")
    max: int = Field(ge=1, description="actors Ray Data may grow the pool to while work waits (as an autoscaling cluster adds nodes)")

    @model_validator(mode="after")
    def _ordered(self) -> "ActorRange":
        if self.max < self.min:
            raise ValueError(f"num_actors: max ({self.max}) is below min ({self.min})")
        return self


class RaySpec(_Spec):
    address: str | None = Field(None, description="null = start an embedded local Ray; 'auto' or ray://HOST:PORT for a cluster")
    num_actors: Annotated[int, Field(ge=1)] | ActorRange = Field(
        1, description="model actors (one SED each): a number, or {min, max} for a pool that grows and shrinks with the work"
    )
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, gt=0)
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all)")


class ErrorBreakerSpec(_Spec):
    max_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="the job stops when one error reason not about the images' own bytes (not found, access denied, "
        "read failed, out of memory, inference failed) takes more than this share of the images judged",
    )
    min_images: int = Field(32, ge=1, description="judged from this many images on (a run with fewer is judged at its end on all it saw)")
    window: int = Field(256, ge=1, description="judged over the last this many images")

    @model_validator(mode="after")
    def _window_holds_min_images(self) -> "ErrorBreakerSpec":
        if self.window < self.min_images:
            raise ValueError(f"window ({self.window}) is below min_images ({self.min_images})")
        return self


class DuplicatesSpec(_Spec):
    reuse_labels: bool = Field(
        True,
        description="an image with the same decoded pixels as one already labelled in this job reuses its labels (its row "
        "names it in duplicate_of) instead of running the model again",
    )
    registry_actors: int = Field(2, ge=1, description="actors holding the job's content hashes, split by hash prefix (memory: about 130 bytes per distinct image)")


class JobSpec(_Spec):
    version: Literal[1] = JOB_SPEC_VERSION
    input: InputSpec
    taxonomy: TaxonomySpec
    model: ModelSpec
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    output: OutputSpec
    ray: RaySpec = Field(default_factory=RaySpec)
    error_breaker: ErrorBreakerSpec | None = Field(
        default_factory=ErrorBreakerSpec,
        description="stops a job whose failures are not the images' fault, before their rows are committed; "
        "null = never stop: every failure is committed as an error row",
    )
    duplicates: DuplicatesSpec = Field(default_factory=DuplicatesSpec, description="exact duplicates labelled once")

    @model_validator(mode="after")
    def _gpu_needs_cuda(self) -> "JobSpec":
        if self.inference.device == "cuda" and self.ray.gpus_per_actor == 0:
            raise ValueError("inference.device is 'cuda' but ray.gpus_per_actor is 0: actors would get no GPU")
        return self
