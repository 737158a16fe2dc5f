"""Class names -> per-template text embeddings, in the style of OpenCLIP's zero-shot classifier.

Every class name is formatted into each prompt template; a name holding `", "` lists synonyms, each
formatted and encoded, averaged per template and normalised again. The result `(T, P, D)` depends
only on the names, the templates and the text tower, so it is computed once per taxonomy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from .backbone import CLIPBackbone

# The paper's 80 ImageNet prompt templates, as `{}` format strings (OpenCLIP keeps them as lambdas).
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)

SYNONYM_SEPARATOR = ", "


class TaxonomyError(ValueError):
    """A class list or template list that cannot be encoded."""


def split_synonyms(name: str) -> list[str]:
    """`"person, human"` -> `["person", "human"]`; names are otherwise used verbatim (even `"bed "`)."""
    return name.split(SYNONYM_SEPARATOR)


def validate_taxonomy(classes: Sequence[str], templates: Sequence[str]) -> None:
    """Raise `TaxonomyError` naming the offending entry."""
    if isinstance(classes, str) or not len(classes):
        raise TaxonomyError("taxonomy classes must be a non-empty list of names")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise TaxonomyError(f"taxonomy class {i} is empty or not a string: {name!r}")
        if name in seen:
            raise TaxonomyError(f"taxonomy class {i} {name!r} duplicates class {seen[name]}")
        seen[name] = i
    if isinstance(templates, str) or not len(templates):
        raise TaxonomyError("prompt templates must be a non-empty list of strings containing '{}'")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or "{}" not in template:
            raise TaxonomyError(f"prompt template {i} must be a string containing '{{}}', got {template!r}")


def taxonomy_hash(classes: Sequence[str], templates: Sequence[str]) -> str:
    """A stable hex digest of what the text embeddings depend on (besides the text tower's weights)."""
    payload = json.dumps({"classes": list(classes), "templates": list(templates)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@torch.no_grad()
def encode_classes(backbone: CLIPBackbone, classes: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """Encode a taxonomy: `(T, P, D)` float32, L2-normalised along D, on the backbone's device.

    Each class's prompts (every synonym in every template) are one batch of their own, so a class's
    embedding depends on nothing else in the list: a taxonomy encoded in slices, by several
    processes, gives the same embeddings bit for bit as encoded whole.
    """
    validate_taxonomy(classes, templates)
    device = next(backbone.parameters()).device
    per_class = []
    for name in classes:
        synonyms = split_synonyms(name)
        prompts = [template.replace("{}", synonym) for synonym in synonyms for template in templates]
        tokens = open_clip.tokenize(prompts, context_length=backbone.context_length)
        block = backbone.encode_text(tokens.to(device)).float().view(len(synonyms), len(templates), -1)
        per_class.append(block[0] if len(synonyms) == 1 else torch.nn.functional.normalize(block.mean(dim=0), dim=-1))
    return torch.stack(per_class)
