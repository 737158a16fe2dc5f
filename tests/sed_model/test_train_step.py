"""The paper's training recipe: what is trained, parameter groups, schedule, clipping, and a falling loss."""

from __future__ import annotations

import math

import pytest
import torch

import sed_model
from sed_model.train_step import Recipe, cosine_factor, freeze_for_training
from tests.helpers import TINY_CHECKPOINT


def small_tiny_model(reference: dict, image_size: int = 128) -> sed_model.SED:
    """The fixture checkpoint at a small input size: the recipe's machinery, fast on CPU."""
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], image_size=image_size))
    sed_model.load_checkpoint(model, str(TINY_CHECKPOINT))
    return model


def test_only_the_decoder_and_the_image_tower_are_trained(reference):
    model = small_tiny_model(reference)
    trained = {id(p) for p in freeze_for_training(model)}
    for name, parameter in model.named_parameters():
        expected = name.startswith("decoder.") or name.startswith("backbone.clip.visual.")
        assert (id(parameter) in trained) == expected == parameter.requires_grad, name
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("token_embedding" in n for n in frozen) and any("transformer" in n for n in frozen)
    assert any("logit_scale" in n for n in frozen) and any("text_projection" in n for n in frozen)


def test_parameter_groups_follow_the_recipe(reference):
    model = small_tiny_model(reference)
    recipe = Recipe()
    optimizer = sed_model.build_optimizer(model, recipe)
    by_name = {name: group for group in optimizer.param_groups for name in group["names"]}
    assert len(by_name) == sum(p.requires_grad for p in model.parameters())  # every trained parameter, once
    assert isinstance(optimizer, torch.optim.AdamW)

    def settings(name: str) -> tuple[float, float]:
        return by_name[name]["lr"], by_name[name]["weight_decay"]

    # Decoder: full lr; decay for convolutions, linears and their biases, none for norms.
    assert settings("decoder.conv1.weight") == (2e-4, 1e-4)
    assert settings("decoder.conv1.bias") == (2e-4, 1e-4)
    assert settings("decoder.decoder1.cnext.gamma") == (2e-4, 1e-4)
    assert settings("decoder.decoder1.attention.norm1.weight") == (2e-4, 0.0)
    assert settings("decoder.decoder1.conv.double_conv.1.weight") == (2e-4, 0.0)  # GroupNorm
    # Image tower: 0.01x lr; timm's LayerNorm2d (stem) and LayerNorm count as norms.
    visual = [name for name in by_name if name.startswith("backbone.clip.visual.")]
    assert visual and all(math.isclose(by_name[name]["lr"], 2e-6) for name in visual)
    stem_norm = next(name for name in visual if ".stem.1." in name)
    assert settings(stem_norm)[1] == 0.0
    conv = next(name for name in visual if name.endswith("conv_dw.weight"))
    assert settings(conv)[1] == 1e-4


def test_cosine_schedule_from_lr_to_zero_without_warm_up(reference):
    assert cosine_factor(0, 100) == 1.0
    assert math.isclose(cosine_factor(50, 100), 0.5)
    assert math.isclose(cosine_factor(100, 100), 0.0, abs_tol=1e-12)
    assert cosine_factor(150, 100) == cosine_factor(100, 100)
    model = small_tiny_model(reference)
    recipe = Recipe(iterations=10)
    optimizer = sed_model.build_optimizer(model, recipe)
    schedule = sed_model.build_schedule(optimizer, recipe)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    expected = recipe.lr * cosine_factor(3, 10)
    assert math.isclose(optimizer.param_groups[0]["lr"], expected)
    assert math.isclose(optimizer.param_groups[-1]["lr"], expected * recipe.image_tower_lr_multiplier)


def test_train_step_clips_all_trained_gradients_together_and_the_loss_falls(reference):
    torch.manual_seed(0)
    model = small_tiny_model(reference)
    images = torch.stack(reference["train_images"])
    targets = reference["train_target"]
    text = reference["text_features"]
    recipe = Recipe(lr=1e-3, iterations=100)
    optimizer = sed_model.build_optimizer(model, recipe)
    schedule = sed_model.build_schedule(optimizer, recipe)
    records = [sed_model.train_step(model, images, targets, text, optimizer, schedule, recipe) for _ in range(6)]

    first = records[0]
    assert set(first) == {"loss_sem_seg_0", "loss_sem_seg_1", "loss_sem_seg_2", "loss_sem_seg_3", "loss", "grad_norm", "lr"}
    assert math.isclose(first["loss"], sum(first[f"loss_sem_seg_{i}"] for i in range(4)), rel_tol=1e-6)
    assert first["grad_norm"] > recipe.clip_grad_norm  # so clipping had work to do
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trained if p.grad is not None]))
    assert float(clipped) <= recipe.clip_grad_norm * (1 + 1e-5)
    assert [r["lr"] for r in records] == pytest.approx([recipe.lr * cosine_factor(i, 100) for i in range(6)])
    assert records[-1]["loss"] < 0.9 * first["loss"]  # measured: 2.81 -> 2.12 in 6 steps


def test_recipe_refuses_meaningless_settings():
    with pytest.raises(ValueError, match="recipe.lr"):
        Recipe(lr=0)
    with pytest.raises(ValueError, match="recipe.iterations"):
        Recipe(iterations=0)
    with pytest.raises(ValueError, match="recipe.precision"):
        Recipe(precision="float64")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_runs_the_forward_in_half_precision_and_trains(reference, precision):
    images = torch.stack(reference["train_images"])
    targets, text = reference["train_target"], reference["text_features"]

    def run(precision: str) -> tuple[list[dict], torch.dtype, sed_model.SED]:
        torch.manual_seed(0)
        model = small_tiny_model(reference)
        recipe = Recipe(lr=1e-3, iterations=100, precision=precision)
        optimizer = sed_model.build_optimizer(model, recipe)
        schedule = sed_model.build_schedule(optimizer, recipe)
        scaler = sed_model.build_grad_scaler(recipe, "cpu")
        dtypes = []
        hook = model.decoder.conv1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        records = [sed_model.train_step(model, images, targets, text, optimizer, schedule, recipe, scaler=scaler) for _ in range(4)]
        hook.remove()
        return records, dtypes[0], model

    exact, exact_dtype, _ = run("float32")
    mixed, mixed_dtype, model = run(precision)
    assert exact_dtype == torch.float32 and mixed_dtype == getattr(torch, precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimiser stay float32
    assert mixed[0]["loss"] == pytest.approx(exact[0]["loss"], rel=0.02)
    assert mixed[-1]["loss"] < 0.95 * mixed[0]["loss"]
    # Gradients are unscaled before clipping: the norm is the true one, not the scaled one.
    assert mixed[0]["grad_norm"] == pytest.approx(exact[0]["grad_norm"], rel=0.1)


def test_precision_resolution_and_the_scaler_rule(reference):
    assert sed_model.training_precision("auto", "cpu") == "float32"
    assert sed_model.training_precision("bfloat16", "cpu") == "bfloat16"
    assert sed_model.build_grad_scaler(Recipe(precision="bfloat16"), "cpu") is None
    model = small_tiny_model(reference)
    recipe = Recipe(precision="float16")
    optimizer = sed_model.build_optimizer(model, recipe)
    with pytest.raises(ValueError, match="GradScaler"):
        sed_model.train_step(
            model, torch.stack(reference["train_images"]), reference["train_target"], reference["text_features"],
            optimizer, sed_model.build_schedule(optimizer, recipe), recipe,
        )


def test_class_logits_take_each_groups_best_prompt_and_leave_distractors_out():
    logits = torch.tensor([1.0, 3.0, -2.0, 0.5, 9.0]).view(1, 5, 1, 1).repeat(2, 1, 2, 3).requires_grad_()
    prompt_class = torch.tensor([0, 0, 1, 2, -1])  # prompts 0, 1 form class 0; prompt 4 is a distractor
    grouped = sed_model.class_logits(logits, prompt_class, 3)
    assert grouped.shape == (2, 3, 2, 3)
    assert grouped[0, :, 0, 0].tolist() == [3.0, -2.0, 0.5]
    grouped.sum().backward()
    # The gradient reaches the prompt that wins each pixel, never the loser nor the distractor.
    assert logits.grad[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_train_step_on_prompts_trains_the_classes_they_form(reference):
    """One prompt per class: the same step as without `prompt_class`. Groups: the loss of the classes."""
    images = torch.stack(reference["train_images"])
    targets = reference["train_target"]
    text = reference["text_features"]
    recipe = Recipe(lr=1e-3, iterations=10)
    records = []
    for prompt_class in (None, torch.arange(text.shape[0])):
        torch.manual_seed(0)
        model = small_tiny_model(reference)
        optimizer = sed_model.build_optimizer(model, recipe)
        schedule = sed_model.build_schedule(optimizer, recipe)
        records.append(sed_model.train_step(model, images, targets, text, optimizer, schedule, recipe, prompt_class=prompt_class))
    assert records[0]["loss"] == pytest.approx(records[1]["loss"], rel=1e-6)

    # A second copy of every prompt, grouped with it, and a distractor: the same classes, the same loss.
    doubled = torch.cat([text, text, text[:1]])
    prompt_class = torch.cat([torch.arange(text.shape[0]), torch.arange(text.shape[0]), torch.tensor([-1])])
    torch.manual_seed(0)
    model = small_tiny_model(reference)
    optimizer = sed_model.build_optimizer(model, recipe)
    schedule = sed_model.build_schedule(optimizer, recipe)
    grouped = sed_model.train_step(model, images, targets, doubled, optimizer, schedule, recipe, prompt_class=prompt_class)
    assert grouped["loss"] == pytest.approx(records[0]["loss"], rel=1e-4)
