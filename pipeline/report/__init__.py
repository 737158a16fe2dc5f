"""Pseudo-label quality reports: streamed statistics (`stats`), agreement with ground truth, HTML.

Entry point: `build_report(output_url)`.
"""

from .build import REPORT_HTML, REPORT_JSON, ReportError, build_report

__all__ = ["REPORT_HTML", "REPORT_JSON", "ReportError", "build_report"]
