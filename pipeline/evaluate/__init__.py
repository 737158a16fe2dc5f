"""Benchmark evaluation under the paper's protocol: the labelling job's read and model stages, each
image scored against its label map on CPU tasks, summed into one streamed confusion matrix.

Entry point: `run_benchmark(settings)`.
"""

from .benchmark import BenchmarkError, BenchmarkSettings, model_from_argument, paper_row, run_benchmark, save_result, summary_lines

__all__ = ["BenchmarkError", "BenchmarkSettings", "model_from_argument", "paper_row", "run_benchmark", "save_result", "summary_lines"]
