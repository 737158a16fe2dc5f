"""Data contracts of sed-label: the job and training specs (pydantic) and the output schemas (pyarrow)."""

from .job import DEFAULT_MAX_PIXELS, JOB_SPEC_VERSION, InferenceSpec, InputSpec, JobSpec, ModelSpec, OutputSpec, RaySpec, TaxonomySpec
from .train import TRAIN_SPEC_VERSION, RecipeSpec, TrainDataSpec, TrainOutputSpec, TrainScalingSpec, TrainSpec, ValidationSpec
from .labels import (
    CLASS_LABEL,
    COCO_CATEGORY_OFFSET,
    LABELS_SCHEMA,
    LABELS_SCHEMA_VERSION,
    STATUS_ERROR,
    STATUS_OK,
    png_unlabeled_value,
    read_labels_parquet,
    read_labels_table,
)

__all__ = [
    "CLASS_LABEL",
    "COCO_CATEGORY_OFFSET",
    "DEFAULT_MAX_PIXELS",
    "InferenceSpec",
    "InputSpec",
    "JOB_SPEC_VERSION",
    "JobSpec",
    "LABELS_SCHEMA",
    "LABELS_SCHEMA_VERSION",
    "ModelSpec",
    "OutputSpec",
    "RaySpec",
    "STATUS_ERROR",
    "STATUS_OK",
    "TaxonomySpec",
    "RecipeSpec",
    "TRAIN_SPEC_VERSION",
    "TrainDataSpec",
    "TrainOutputSpec",
    "TrainScalingSpec",
    "TrainSpec",
    "ValidationSpec",
    "png_unlabeled_value",
    "read_labels_parquet",
    "read_labels_table",
]
