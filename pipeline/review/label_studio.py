"""Label Studio: the labelling config and tasks a review exports, and the corrections it exports back.

Out: a `<BrushLabels>` control (`tag`) with one `<Label>` per output class, in the report's
colours; each task carries one `brushlabels` prediction result per class present, the image's
mean margin as the prediction's `score` (Label Studio's "Uncertainty sampling" serves the lowest
first) and the job's image index and id in `data`. With the job's margin maps (format
`confidence`), a read-only second layer (`uncertain`: pixels under `LOW_MARGIN`) and, where the
images are served, a second image, the margin as a heat map.

Back: per task, its latest annotation that was not cancelled; each `tag` region's alpha > 0 (as
Label Studio's own converters take it) painted in the order of the results, so a region drawn
later (drawn on top in the editor) wins where two overlap; such pixels are counted.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from schemas import LOW_MARGIN, MARGIN_PNG_SCALE

from .brush_rle import BrushRLEError, mask_to_rle, rle_to_alpha
from .ground_truth import Correction
from .rows import ReviewError

TAG, IMAGE = "tag", "image"
UNCERTAIN, LOW_CONFIDENCE, UNCERTAINTY_IMAGE = "uncertain", "low_confidence", "uncertainty"
UNCERTAIN_COLOUR = "#ffd700"


def label_config(classes: list[str], colours: list[str], uncertainty_layer: bool, uncertainty_image: bool) -> str:
    """The project's labelling config (Label Studio XML)."""
    labels = "\n".join(f"    <Label value={quoteattr(name)} background={quoteattr(colour)}/>" for name, colour in zip(classes, colours))
    lines = ["<View>", f'  <Image name="{IMAGE}" value="${IMAGE}"/>', f'  <BrushLabels name="{TAG}" toName="{IMAGE}">', labels, "  </BrushLabels>"]
    if uncertainty_layer:
        lines += [
            f'  <BrushLabels name="{UNCERTAIN}" toName="{IMAGE}">',
            f'    <Label value="{LOW_CONFIDENCE}" background="{UNCERTAIN_COLOUR}"/>',
            "  </BrushLabels>",
        ]
    if uncertainty_image:
        lines += [
            '  <Header value="How sure the model was (dark: two classes close)"/>',
            f'  <Image name="{UNCERTAINTY_IMAGE}" value="${UNCERTAINTY_IMAGE}"/>',
        ]
    return "\n".join([*lines, "</View>"]) + "\n"


def task(
    row: dict[str, Any],
    image_url: str,
    classes: list[str],
    label_map: np.ndarray,
    model_version: str,
    margin_map: np.ndarray | None = None,
    uncertainty_url: str | None = None,
) -> dict[str, Any]:
    """One image's task: its data and the job's labels as an editable brush prediction."""
    size = {"original_width": int(row["width"]), "original_height": int(row["height"]), "image_rotation": 0}
    results = []
    for label in sorted(row["labels"], key=lambda entry: entry["class_id"]):
        mask = label_map == label["class_id"]
        value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [classes[label["class_id"]]]}
        results.append(
            {"id": f"sed-{label['class_id']}", "from_name": TAG, "to_name": IMAGE, "type": "brushlabels", **size,
             "score": round(float(label["mean_prob"]), 4), "value": value}
        )
    if margin_map is not None:
        doubtful = margin_map < round(LOW_MARGIN * MARGIN_PNG_SCALE)
        if doubtful.any():
            value = {"format": "rle", "rle": mask_to_rle(doubtful), "brushlabels": [LOW_CONFIDENCE]}
            results.append(
                {"id": "sed-uncertain", "from_name": UNCERTAIN, "to_name": IMAGE, "type": "brushlabels", **size,
                 "readonly": True, "value": value}
            )
    data = {IMAGE: image_url, "sed_image_index": int(row["image_index"]), "sed_image_id": row["image_id"]}
    if uncertainty_url is not None:
        data[UNCERTAINTY_IMAGE] = uncertainty_url
    score = float(row["mean_margin"]) if row["mean_margin"] is not None else None
    return {"data": data, "predictions": [{"model_version": model_version, "score": score, "result": results}]}


def corrections(tasks: list[dict[str, Any]], classes: list[str], sizes: dict[int, tuple[int, int]], unlabeled: int, unpainted: int | None) -> tuple[list[Correction], list[int]]:
    """A Label Studio JSON export -> the corrections of its annotated tasks, and the ids of the
    tasks nobody annotated. `sizes`: (height, width) by job image index; `unpainted`: the class
    id unpainted pixels become (None: left unlabeled)."""
    class_ids = {name: i for i, name in enumerate(classes)}
    found, untouched = [], []
    for entry in tasks:
        task_id = entry.get("id")
        where = f"Label Studio task {task_id}"
        data = entry.get("data") or {}
        if "sed_image_index" not in data:
            raise ReviewError(f"{where}: its data has no sed_image_index: not a task of `sed-label review export`")
        index = int(data["sed_image_index"])
        if index not in sizes:
            raise ReviewError(f"{where}: image {data.get('sed_image_id')!r} (index {index}) is not among the job's committed images")
        annotation = _latest_annotation(entry.get("annotations") or [])
        if annotation is None:
            untouched.append(task_id)
            continue
        where = f"{where} (image {data.get('sed_image_id')!r}, annotation {annotation.get('id')})"
        height, width = sizes[index]
        label_map = np.full((height, width), unlabeled, dtype=np.uint8 if unlabeled == 255 else np.uint16)
        painted = np.zeros((height, width), dtype=bool)
        overlap = np.zeros((height, width), dtype=bool)
        for result in annotation.get("result") or []:
            if result.get("from_name") != TAG:
                continue  # the read-only uncertainty layer, or another control
            if result.get("type") != "brushlabels":
                raise ReviewError(f"{where}: a {result.get('type')!r} region; only brush regions are read")
            names = result["value"].get("brushlabels") or []
            if len(names) != 1 or names[0] not in class_ids:
                raise ReviewError(f"{where}: label {names!r} is not one of the job's classes")
            if (result.get("original_height"), result.get("original_width")) != (height, width):
                raise ReviewError(
                    f"{where}: a region of {result.get('original_width')}x{result.get('original_height')} on an image of {width}x{height}"
                )
            try:
                mask = rle_to_alpha(result["value"]["rle"], height, width) > 0
            except BrushRLEError as exc:
                raise ReviewError(f"{where}: {exc}") from exc
            overlap |= painted & mask & (label_map != class_ids[names[0]])
            label_map[mask] = class_ids[names[0]]
            painted |= mask
        if unpainted is not None:
            label_map[~painted] = unpainted
        completed_by = annotation.get("completed_by")
        # The JSON export names the annotator by user id (some exports expand it to the user).
        if isinstance(completed_by, dict):
            reviewer = completed_by.get("email") or f"Label Studio user {completed_by.get('id')}"
        else:
            reviewer = None if completed_by is None else f"Label Studio user {completed_by}"
        found.append(
            Correction(
                index, label_map, reviewer, annotation.get("updated_at") or annotation.get("created_at"),
                int(overlap.sum()), int((~painted).sum()), f"task {task_id}, annotation {annotation.get('id')}",
            )
        )
    return found, untouched


def _latest_annotation(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last annotation not cancelled (by update time, then id)."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (_time(a.get("updated_at") or a.get("created_at")), a.get("id") or 0))


def _time(text: str | None) -> dt.datetime:
    """An export's ISO time (with or without fractions or an offset) as an aware time; none = earliest."""
    if not text:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ReviewError(f"an annotation's time {text!r} is not an ISO time: not a Label Studio export?") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
