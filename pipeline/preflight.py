"""Checks that refuse a bad job before any work starts, each naming the field and the reason."""

from __future__ import annotations

import uuid

import sed_model
from schemas import JobSpec

from .model_loading import model_config
from .storage import StorageError, filesystem, is_process_local
from .taxonomy import Taxonomy, load_taxonomy


class PreflightError(ValueError):
    """A job spec that validates but cannot run; the message names the field."""


def preflight(spec: JobSpec) -> Taxonomy:
    """Check model, taxonomy, weights, input and output; return the resolved taxonomy."""
    try:
        config = model_config(spec.model)
        config.open_clip_config()
    except (sed_model.UnknownModelError, ValueError) as exc:
        raise PreflightError(f"model.clip_model: {exc}") from exc
    try:
        taxonomy = load_taxonomy(spec.taxonomy)
    except (sed_model.TaxonomyError, StorageError) as exc:
        raise PreflightError(f"taxonomy: {exc}") from exc
    if len(taxonomy.templates) != config.num_templates:
        raise PreflightError(
            f"taxonomy.templates: SED takes exactly {config.num_templates} templates (one input channel each), "
            f"got {len(taxonomy.templates)}"
        )
    if spec.model.weights is not None:
        _check_readable("model.weights", spec.model.weights, spec.model.storage_options, shared=True)
    _check_readable("input.url", spec.input.url, spec.input.storage_options, shared=False)
    _check_writable("output.url", spec.output.url, spec.output.storage_options)
    return taxonomy


def _check_readable(field: str, url: str, storage_options: dict, shared: bool) -> None:
    try:
        fs, path = filesystem(url, storage_options)
        if shared and is_process_local(fs):
            raise PreflightError(f"{field}: {url!r} lives in this process's memory; Ray actors cannot read it")
        glob = any(ch in path for ch in "*?[")
        if not glob and not fs.exists(path):
            raise PreflightError(f"{field}: {url!r} does not exist")
    except PreflightError:
        raise
    except Exception as exc:  # credentials, unknown protocol, unreachable endpoint...
        raise PreflightError(f"{field}: cannot reach {url!r}: {type(exc).__name__}: {exc}") from exc


def _check_writable(field: str, url: str, storage_options: dict) -> None:
    try:
        fs, path = filesystem(url, storage_options)
        probe = f"{path.rstrip('/')}/.sed-label-write-test-{uuid.uuid4().hex}"
        existed = fs.exists(path)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
        if not existed and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)  # a refused job leaves no trace; the job itself creates the folder
    except Exception as exc:  # permission denied, missing bucket, read-only file system...
        raise PreflightError(f"{field}: cannot write to {url!r}: {type(exc).__name__}: {exc}") from exc
