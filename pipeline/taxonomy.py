"""The job's taxonomy: output classes, the prompts the model scores for them, distractors, templates.

The model sees prompts: every prompt is a class for it, with its own text embedding and its own
early rejection. The outputs speak in output classes: a plain class is one prompt (", " synonyms
are averaged in embedding space, as before); a group's probability at a pixel is the maximum over
its prompts' probabilities, so a pixel's class is the class of its best prompt; a pixel whose best
prompt is a distractor is unlabeled. `Taxonomy.output_labels` is that mapping.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

import sed_model
from schemas import PromptGroup, TaxonomySpec
from schemas.job import class_entry, taxonomy_problem

from .storage import StorageError, filesystem

DISTRACTOR = -1  # `prompt_class` of a distractor prompt


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[str, ...]  # output classes, in label order
    templates: tuple[str, ...]
    prompts: tuple[str, ...] = ()  # what the model scores: the classes' prompts, then the distractors
    prompt_class: tuple[int, ...] = ()  # per prompt: its output class, or DISTRACTOR

    def __post_init__(self) -> None:
        if not self.prompts:  # a flat taxonomy: each class is its own prompt
            object.__setattr__(self, "prompts", self.classes)
            object.__setattr__(self, "prompt_class", tuple(range(len(self.classes))))

    @classmethod
    def build(cls, classes: list[str | PromptGroup | dict[str, Any]], distractors: list[str], templates: tuple[str, ...]) -> Taxonomy:
        problem = taxonomy_problem(classes, distractors)
        if problem:
            raise sed_model.TaxonomyError(f"taxonomy: {problem}")
        names, prompts, prompt_class = [], [], []
        for index, entry in enumerate(classes):
            name, members = class_entry(entry)
            names.append(name)
            prompts.extend(members)
            prompt_class.extend([index] * len(members))
        prompts.extend(distractors)
        prompt_class.extend([DISTRACTOR] * len(distractors))
        sed_model.text.validate_taxonomy(prompts, templates)
        return cls(tuple(names), tuple(templates), tuple(prompts), tuple(prompt_class))

    @property
    def is_flat(self) -> bool:
        return self.prompts == self.classes

    @property
    def distractors(self) -> tuple[str, ...]:
        return tuple(p for p, c in zip(self.prompts, self.prompt_class) if c == DISTRACTOR)

    def class_prompts(self, index: int) -> tuple[str, ...]:
        return tuple(p for p, c in zip(self.prompts, self.prompt_class) if c == index)

    @property
    def hash(self) -> str:
        """What the labels' meaning depends on: for a flat taxonomy its classes and templates, as the
        model's `taxonomy_hash`; with groups or distractors, the whole structure."""
        if self.is_flat:
            return sed_model.taxonomy_hash(self.classes, self.templates)
        payload = json.dumps(
            {"classes": self.classes, "prompts": self.prompts, "prompt_class": self.prompt_class, "templates": self.templates},
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def structure(self) -> dict[str, Any]:
        """The taxonomy as a user wrote it (for job.json, reports and `sed-label validate`)."""
        return {
            "classes": [{"name": name, "prompts": list(self.class_prompts(i))} for i, name in enumerate(self.classes)],
            "distractors": list(self.distractors),
        }

    def prompt_groups(self) -> torch.Tensor | None:
        """Per prompt, the concept it stands for (its output class; each distractor its own), for the
        model's runner-up (`label_batch(class_groups=)`); None for a flat taxonomy (prompts are classes)."""
        if self.is_flat:
            return None
        n = len(self.classes)
        distractor_ids = iter(range(n, n + len(self.prompts)))
        return torch.tensor([next(distractor_ids) if c == DISTRACTOR else c for c in self.prompt_class])

    def output_labels(self, prompt_labels: torch.Tensor, unlabeled: int) -> torch.Tensor:
        """Per-pixel best-prompt indices -> output class indices (`unlabeled` where a distractor won)."""
        if self.is_flat:
            return prompt_labels
        table = torch.tensor([unlabeled if c == DISTRACTOR else c for c in self.prompt_class], dtype=prompt_labels.dtype)
        return table.to(prompt_labels.device)[prompt_labels]


def load_taxonomy(spec: TaxonomySpec) -> Taxonomy:
    """Resolve the classes (inline, or a JSON list / text file at a path or URL), distractors and templates."""
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
            if not isinstance(classes, list) or not all(isinstance(c, (str, dict)) for c in classes):
                raise sed_model.TaxonomyError(f"taxonomy.classes {url!r} must hold a JSON list of names or {{name, prompts}} groups")
            try:
                classes = [c if isinstance(c, str) else PromptGroup.model_validate(c) for c in classes]
            except ValueError as exc:
                raise sed_model.TaxonomyError(f"taxonomy.classes {url!r}: {exc}") from exc
        else:
            classes = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    templates = sed_model.IMAGENET_TEMPLATES if spec.templates == "imagenet" else tuple(spec.templates)
    return Taxonomy.build(list(classes), list(spec.distractors), tuple(templates))
