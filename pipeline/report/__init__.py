"""Pseudo-label quality reports: streamed statistics (`stats`), agreement with ground truth, HTML."""

from .build import build_report

__all__ = ["build_report"]
