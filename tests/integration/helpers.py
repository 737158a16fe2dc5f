"""Reading a job's outputs back, and what the model says about the same images."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import sed_model
from pipeline.commit import OutputStore
from pipeline.decode import decode_image
from pipeline.report.build import label_map_of  # noqa: F401  (re-exported for the tests)


def read_rows(store: OutputStore) -> list[dict]:
    """Every Parquet row of the committed shards."""
    tables = []
    for shard, marker in sorted(store.committed_shards().items()):
        with store.fs.open(store.path(marker["files"][0]), "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).to_pylist() if tables else []


def model_labels(model: sed_model.SED, data: bytes, top_k: int | None, text: torch.Tensor, classes: list[str]) -> tuple[np.ndarray, list[int]]:
    predictor = sed_model.SEDPredictor(model, top_k=top_k)
    predictor.set_taxonomy(classes, text_features=text)
    image = torch.from_numpy(decode_image(data, 50_000_000)).permute(2, 0, 1)
    labeling = predictor.label_batch([image])[0]
    return labeling.labels.numpy().astype(np.uint16), labeling.kept.tolist()
