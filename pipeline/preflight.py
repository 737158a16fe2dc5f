"""Checks that refuse a bad job before any work starts, each naming the field and the reason."""

from __future__ import annotations

import uuid

import sed_model
from schemas import JobSpec, ModelSpec, TrainSpec
from sed_model.clip_weights import is_clip_weights_file, pretrained_config
from sed_model.config import resolve_clip_config

from .model_loading import model_config
from .storage import StorageError, filesystem, is_process_local
from .taxonomy import Taxonomy, load_taxonomy


class PreflightError(ValueError):
    """A job spec that validates but cannot run; the message names the field."""


def preflight(spec: JobSpec, check_output: bool = True) -> Taxonomy:
    """Check model, taxonomy, weights, input and (unless told not to: a preview writes elsewhere)
    output; return the resolved taxonomy."""
    config = _check_model(spec.model)
    try:
        taxonomy = load_taxonomy(spec.taxonomy)
    except (sed_model.TaxonomyError, StorageError) as exc:
        raise PreflightError(f"taxonomy: {exc}") from exc
    _check_templates(taxonomy, config)
    _check_weights(spec.model)
    _check_readable("input.url", spec.input.url, spec.input.storage_options, shared=False)
    if check_output:
        check_writable("output.url", spec.output.url, spec.output.storage_options)
    return taxonomy


def preflight_training(spec: TrainSpec, taxonomy: Taxonomy, resuming: bool = False) -> None:
    """A training spec's model, weights (SED or OpenCLIP) and output; its data is checked by `training_inputs`.

    A resumed run's starting weights are not checked: it reads them from its state instead.
    """
    config = _check_model(spec.model)
    _check_templates(taxonomy, config)
    if not resuming:
        _check_weights(spec.model)
    check_writable("output.url", spec.output.url, spec.output.storage_options)


def _check_model(model: ModelSpec) -> sed_model.SEDConfig:
    try:
        config = model_config(model)
        _, architecture, preset_tag = resolve_clip_config(config.clip_model)
    except (sed_model.UnknownModelError, ValueError) as exc:
        raise PreflightError(f"model.clip_model: {exc}") from exc
    if model.clip_weights is not None and not is_clip_weights_file(model.clip_weights):
        try:
            pretrained_config(architecture, preset_tag, model.clip_weights)
        except sed_model.ClipWeightsError as exc:
            raise PreflightError(f"model.{exc}") from exc
    return config


def _check_templates(taxonomy: Taxonomy, config: sed_model.SEDConfig) -> None:
    if len(taxonomy.templates) != config.num_templates:
        raise PreflightError(
            f"taxonomy.templates: SED takes exactly {config.num_templates} templates (one input channel each), "
            f"got {len(taxonomy.templates)}"
        )


def _check_weights(model: ModelSpec) -> None:
    if model.weights is not None:
        _check_readable("model.weights", model.weights, model.storage_options, shared=True)
    if model.clip_weights is not None and is_clip_weights_file(model.clip_weights):
        _check_readable("model.clip_weights", model.clip_weights, model.storage_options, shared=True)


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


def check_writable(field: str, url: str, storage_options: dict) -> None:
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
