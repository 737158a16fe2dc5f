"""Pipeline step: the callable class an actor pool runs; one SED per actor, loaded once.

It only runs the model: decoded RGB in, label maps and per-class probability statistics out.
Mask encoding happens after it, on CPU tasks. The taxonomy's text embeddings are computed once per
job and handed in (Ray resolves the object reference), never recomputed per actor or batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import sed_model
from schemas import INFERENCE_FAILED, LOW_MARGIN, MARGIN_PNG_SCALE, OUT_OF_MEMORY, STATUS_ERROR, STATUS_OK, InferenceSpec, ModelSpec

from .model_loading import load_model, resolve_device
from .process import prepare_process
from .taxonomy import Taxonomy

logger = logging.getLogger(__name__)
UNLABELED = np.uint16(65535)  # internal label-map value for "no class" (below min_confidence, or a distractor)


def inference_error_message(exc: Exception) -> str:
    """"REASON: exception" for an image the model failed on (alone, after its batch failed)."""
    reason = OUT_OF_MEMORY if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) else INFERENCE_FAILED
    return f"{reason}: {type(exc).__name__}: {exc}"


class SEDInference:
    def __init__(
        self,
        model: dict[str, Any],
        inference: dict[str, Any],
        taxonomy: Taxonomy,
        text_features: np.ndarray | Callable[[], np.ndarray],
        checkpoint_hash: str,
        statistics: bool = False,
        margin_maps: bool = False,
    ) -> None:
        self.model_spec = ModelSpec(**model)
        self.settings = InferenceSpec(**inference)
        device = resolve_device(self.settings.device)
        prepare_process(device)
        model_, loaded_hash = load_model(self.model_spec, device)
        if loaded_hash != checkpoint_hash:
            raise RuntimeError(
                f"the weights at {self.model_spec.weights!r} changed during the job "
                f"(hash {loaded_hash[:12]}, the job started with {checkpoint_hash[:12]})"
            )
        self.predictor = sed_model.SEDPredictor(
            model_,
            top_k=self.settings.top_k,
            short_edge=self.settings.short_edge,
            max_size=self.settings.max_size,
            precision=self.settings.precision,
            tiling=None if self.settings.tiling is None else sed_model.Tiling(**self.settings.tiling.model_dump()),
            windows_per_call=self.settings.batch_size,
        )
        logger.info("inference precision %s on %s (%s)", self.predictor.precision, device, self.predictor.precision_reason)
        self.taxonomy = taxonomy
        self.num_classes = len(taxonomy.classes)
        self.statistics = statistics
        self.margin_maps = margin_maps
        self.class_groups = taxonomy.prompt_groups()
        self.device = device
        self.batches_labelled = 0
        # The prompts of each output class that has several: the row names the one that won most pixels.
        members = {c: [taxonomy.prompts.index(p) for p in taxonomy.class_prompts(c)] for c in range(self.num_classes)}
        self.group_prompts = {c: prompts for c, prompts in members.items() if len(prompts) > 1}
        if callable(text_features):  # fetched once per actor from wherever the executor keeps it
            text_features = text_features()
        self.predictor.set_taxonomy(list(taxonomy.prompts), list(taxonomy.templates), text_features=torch.as_tensor(np.asarray(text_features)))
        model_.drop_text_tower()  # the job computed the text embeddings once; actors never need the tower

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_index"])
        status, error = batch["status"].copy(), batch["error"].copy()
        label_maps = np.empty(n, dtype=object)
        class_ids, mean_probs, max_probs, kept, top_prompts = (np.empty(n, dtype=object) for _ in range(5))
        unlabeled, distractor = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        mean_margin, low_margin_share = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        margin_maps = np.empty(n, dtype=object)
        # Images that reuse another's labels (`label/registry.py`) carry no pixels and skip the model.
        reuses = batch["label_source"] >= 0 if "label_source" in batch else np.zeros(n, bool)
        ok = [i for i in range(n) if status[i] == STATUS_OK and not reuses[i]]
        started = time.perf_counter()
        results = self._label([torch.from_numpy(np.ascontiguousarray(batch["image"][i])).permute(2, 0, 1) for i in ok])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the model's time includes its last kernels
        seconds = (time.perf_counter() - started) / max(len(ok), 1)
        model_seconds = np.zeros(n, dtype=np.float64)
        tiled_windows = np.zeros(n, dtype=np.int32)
        model_seconds[ok] = seconds  # the batch's time shared among the images the model labelled
        labelled = set()
        for i, result in zip(ok, results):
            if isinstance(result, Exception):
                status[i], error[i] = STATUS_ERROR, inference_error_message(result)
                continue
            summary = self._summarise(result)
            label_maps[i], class_ids[i], mean_probs[i], max_probs[i], prompts, unlabeled[i], distractor[i] = summary
            mean_margin[i], low_margin_share[i], margin_maps[i] = self._uncertainty(result)
            top_prompts[i] = json.dumps(prompts)  # per present class: its winning prompt (groups), else null
            kept[i] = result.kept.cpu().numpy().astype(np.int32)
            tiled_windows[i] = result.windows
            labelled.add(i)
        for i in range(n):
            if i not in labelled:
                label_maps[i] = np.zeros((1, 1), np.uint16)
                class_ids[i] = np.zeros(0, np.int32)
                mean_probs[i] = max_probs[i] = np.zeros(0, np.float32)
                kept[i] = np.zeros(0, np.int32)
                top_prompts[i] = "[]"
                margin_maps[i] = None
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(
            status=status,
            error=error,
            label_map=label_maps,
            class_ids=class_ids,
            mean_probs=mean_probs,
            max_probs=max_probs,
            top_prompts=top_prompts,
            kept_classes=kept,
            unlabeled_area=unlabeled,
            distractor_area=distractor,
            mean_margin=mean_margin,
            low_margin_share=low_margin_share,
            model_seconds=model_seconds,
            tiled_windows=tiled_windows,
        )
        if self.margin_maps:
            out["margin_map"] = margin_maps
        if self.statistics:
            out.update(self._preview_statistics(dict(zip(ok, results)), status))
        return out

    def _preview_statistics(self, results: dict[int, Any], status: np.ndarray) -> dict[str, np.ndarray]:
        """What `sed-label preview` measures besides the labels and the model's time: whether this
        actor had labelled a batch before (its first also pays its start), the pixels per (best,
        runner-up) prompt pair, and how many prompts won some pixel."""
        n = len(status)
        pairs, pair_counts = np.empty(n, dtype=object), np.empty(n, dtype=object)
        prompts_won = np.zeros(n, dtype=np.int64)
        for i in range(n):
            pairs[i] = pair_counts[i] = np.zeros(0, np.int64)
            if i in results and status[i] == STATUS_OK:
                pairs[i], pair_counts[i] = self._runner_up_pairs(results[i])
                prompts_won[i] = int(results[i].labels.unique().numel())
        warm = self.batches_labelled > 0
        self.batches_labelled += 1
        return {
            "model_warm": np.full(n, warm),
            "runner_up_pairs": pairs,
            "runner_up_counts": pair_counts,
            "prompts_won": prompts_won,
        }

    def _label(self, images: list[torch.Tensor]) -> list[sed_model.model.Labeling | Exception]:
        """Label the batch; if the batch fails, each image alone, so one bad image costs one row."""
        if not images:
            return []
        try:
            return list(self.predictor.label_batch(images, runner_up=self.statistics, class_groups=self.class_groups, margins=True))
        except Exception:  # retried image by image below; each failure is kept as that image's reason
            results: list[sed_model.model.Labeling | Exception] = []
            for image in images:
                try:
                    results.append(self.predictor.label_batch([image], runner_up=self.statistics, class_groups=self.class_groups, margins=True)[0])
                except Exception as exc:
                    results.append(exc)
            return results

    def _runner_up_pairs(self, labeling: sed_model.model.Labeling) -> tuple[np.ndarray, np.ndarray]:
        """Pixels per (best prompt, runner-up prompt), as flat indices `best * prompts + second`."""
        prompts = len(self.taxonomy.prompts)
        second = labeling.runner_up
        has_second = second >= 0
        flat = (labeling.labels[has_second] * prompts + second[has_second]).cpu()
        counts = torch.bincount(flat, minlength=prompts * prompts)
        pairs = counts.nonzero().flatten()
        return pairs.numpy().astype(np.int64), counts[pairs].numpy().astype(np.int64)

    def _uncertainty(self, labeling: sed_model.model.Labeling) -> tuple[float, float, np.ndarray | None]:
        """The image's mean margin (best class's probability minus the best other class's, 0 where
        there is none), its share of pixels under `LOW_MARGIN`, and the quantised margin map if asked."""
        margin = labeling.margin.float()
        quantised = (margin.clamp(0, 1) * MARGIN_PNG_SCALE).round().to(torch.uint8).cpu().numpy() if self.margin_maps else None
        return float(margin.mean()), float((margin < LOW_MARGIN).float().mean()), quantised

    def _summarise(self, labeling: sed_model.model.Labeling) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str | None], int, int]:
        """A labelling in prompts -> its label map and statistics in output classes.

        A pixel's class is its best prompt's class (a group's probability is the maximum over its
        prompts'); pixels won by a distractor, and those below `min_confidence`, are unlabeled and
        counted apart."""
        prompt_labels = labeling.labels
        labels = self.taxonomy.output_labels(prompt_labels, unlabeled=self.num_classes)
        confidence = labeling.confidence
        won_by_distractor = labels == self.num_classes
        confident = (confidence >= self.settings.min_confidence) & ~won_by_distractor
        flat_labels = labels[confident]
        flat_conf = confidence[confident].float()
        counts = torch.bincount(flat_labels, minlength=self.num_classes)
        present = counts.nonzero().flatten()
        sums = torch.zeros(self.num_classes, dtype=torch.float64, device=labels.device)
        sums.index_add_(0, flat_labels, flat_conf.double())
        maxima = torch.zeros(self.num_classes, device=labels.device).scatter_reduce(0, flat_labels, flat_conf, "amax")
        label_map = torch.where(confident, labels, torch.full_like(labels, int(UNLABELED))).to(torch.int32)
        present_ids = present.cpu().numpy().astype(np.int32)
        top_prompts: list[str | None] = [None] * len(present_ids)
        if self.group_prompts:
            prompt_counts = torch.bincount(prompt_labels[confident], minlength=len(self.taxonomy.prompts)).cpu()
            for k, class_id in enumerate(present_ids):
                members = self.group_prompts.get(int(class_id))
                if members:
                    top_prompts[k] = self.taxonomy.prompts[members[int(prompt_counts[members].argmax())]]
        return (
            label_map.cpu().numpy().astype(np.uint16),
            present_ids,
            (sums[present] / counts[present]).cpu().numpy().astype(np.float32),
            maxima[present].cpu().numpy().astype(np.float32),
            top_prompts,
            int((~confident & ~won_by_distractor).sum()),
            int(won_by_distractor.sum()),
        )
