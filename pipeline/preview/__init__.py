"""`sed-label preview`: a labelled sample of a job's input before the job (classes, confusable
prompts, early rejection, speed and cost).

Entry point: `run_preview(spec, output_url)`.
"""

from .run import PREVIEW_HTML, PREVIEW_JSON, PreviewSettings, run_preview

__all__ = ["PREVIEW_HTML", "PREVIEW_JSON", "PreviewSettings", "run_preview"]
