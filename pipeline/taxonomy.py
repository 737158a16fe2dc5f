"""The job's taxonomy: class names from the spec or a file, templates, and their hash."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sed_model
from schemas import TaxonomySpec

from .storage import StorageError, filesystem


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def hash(self) -> str:
        return sed_model.taxonomy_hash(self.classes, self.templates)


def load_taxonomy(spec: TaxonomySpec) -> Taxonomy:
    """Resolve class names (inline, or a JSON list / text file at a path or URL) and templates."""
    classes = spec.classes
    if isinstance(classes, str):
        url = classes
        try:
            fs, path = filesystem(url, spec.storage_options)
            text = fs.cat_file(path).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read taxonomy.classes {url!r}: {type(exc).__name__}: {exc}") from exc
        if url.lower().endswith(".json"):
            try:
                classes = json.loads(text)
            except json.JSONDecodeError as exc:
                raise sed_model.TaxonomyError(f"taxonomy.classes {url!r} is not valid JSON: {exc}") from exc
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise sed_model.TaxonomyError(f"taxonomy.classes {url!r} must hold a JSON list of strings")
        else:
            classes = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    templates = sed_model.IMAGENET_TEMPLATES if spec.templates == "imagenet" else tuple(spec.templates)
    sed_model.text.validate_taxonomy(classes, templates)
    return Taxonomy(tuple(classes), tuple(templates))
