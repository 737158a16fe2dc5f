"""SED (CVPR 2024) on upstream OpenCLIP: model, checkpoints, text, predictor, loss and training step.

    import sed_model
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model="convnext_b"))
    sed_model.load_checkpoint(model, "sed_model_base.pth")
    text = model.encode_classes(["sky", "person, human"])
    probs = model.predict(image_uint8_chw, text, top_k=8)
"""

from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, read_checkpoint, save_checkpoint
from .clip_weights import ClipWeightsError, load_clip_weights
from .config import PRESETS, SEDConfig, UnknownModelError
from .loss import class_logits, sed_loss
from .factory import create_model
from .model import SED, Prediction, build_sed, cost_volume
from .predictor import SEDPredictor, inference_precision, prepare_cpu_inference
from .text import IMAGENET_TEMPLATES, TaxonomyError, encode_classes, taxonomy_hash
from .tiling import Tiling, label_tiled
from .train_step import Recipe, build_grad_scaler, build_optimizer, build_schedule, train_step, training_precision
from .transforms import resize_shortest_edge

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "ClipWeightsError",
    "IMAGENET_TEMPLATES",
    "PRESETS",
    "Prediction",
    "Recipe",
    "SED",
    "SEDConfig",
    "SEDPredictor",
    "TaxonomyError",
    "Tiling",
    "UnknownModelError",
    "build_grad_scaler",
    "build_optimizer",
    "build_schedule",
    "build_sed",
    "cost_volume",
    "create_model",
    "encode_classes",
    "load_checkpoint",
    "load_clip_weights",
    "inference_precision",
    "label_tiled",
    "prepare_cpu_inference",
    "read_checkpoint",
    "resize_shortest_edge",
    "save_checkpoint",
    "class_logits",
    "sed_loss",
    "taxonomy_hash",
    "train_step",
    "training_precision",
]
