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
def encode_classes(
    backbone: CLIPBackbone,
    classes: Sequence[str],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode a taxonomy: `(T, P, D)` float32, L2-normalised along D, on the backbone's device."""
    validate_taxonomy(classes, templates)
    device = next(backbone.parameters()).device
    # Every (class, synonym, template) prompt, flattened so the text tower sees full batches.
    prompts: list[str] = []
    synonym_counts: list[int] = []
    for name in classes:
        synonyms = split_synonyms(name)
        synonym_counts.append(len(synonyms))
        for synonym in synonyms:
            prompts.extend(template.replace("{}", synonym) for template in templates)
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = open_clip.tokenize(prompts[start : start + batch_size], context_length=backbone.context_length)
        embeddings.append(backbone.encode_text(tokens.to(device)).float())
    flat = torch.cat(embeddings)
    per_class = []
    offset = 0
    num_templates = len(templates)
    for count in synonym_counts:
        block = flat[offset : offset + count * num_templates].view(count, num_templates, -1)
        offset += count * num_templates
        if count == 1:
            per_class.append(block[0])
        else:
            per_class.append(torch.nn.functional.normalize(block.mean(dim=0), dim=-1))
    return torch.stack(per_class)
