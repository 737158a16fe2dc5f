"""The review loop: a job's least certain images out to Label Studio or CVAT, corrections back as ground truth."""

from .ground_truth import MANIFEST as GROUND_TRUTH_MANIFEST
from .ground_truth import TRAIN_SPEC
from .rows import ReviewError, Selection
from .run import TOOLS, ExportSettings, ImportSettings, export_review, import_review

__all__ = ["GROUND_TRUTH_MANIFEST", "TRAIN_SPEC", "TOOLS", "ExportSettings", "ImportSettings", "ReviewError", "Selection", "export_review", "import_review"]
