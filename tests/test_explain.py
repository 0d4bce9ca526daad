"""The shared-pass explanations equal pytorch-grad-cam's own classes, and hooks are released."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bad_inputs import textured
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from mura_demo.core.config import ModelConfig
from mura_demo.core.explain import METHODS, explain
from mura_demo.core.model import create_model
from mura_demo.core.preprocess import to_model_input
from mura_demo.core.render import overlay


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = ModelConfig()
    model = create_model(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, box = to_model_input(textured((300, 200)), config)
    return config, model, model.get_submodule(config.cam_layer), x, box


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "method,cls",
    [
        ("gradcam", GradCAM),
        ("gradcam++", GradCAMPlusPlus),
        ("hirescam", HiResCAM),
        ("xgradcam", XGradCAM),
        ("layercam", LayerCAM),
    ],
)
def test_shared_pass_matches_library_class(setup, method, cls):
    config, model, layer, x, _ = setup
    column = config.abnormality_index("humerus")
    _, maps = explain(model, layer, x, lambda logits: column, [method])
    with cls(model, [layer]) as cam:
        cam.compute_input_gradient = True  # the served model's weights are frozen
        reference = cam(x, [ClassifierOutputTarget(column)])[0]
    assert maps[method].shape == reference.shape == (config.input_size, config.input_size)
    assert np.abs(maps[method] - reference).max() < 1e-4
    assert maps[method].max() > 0.5  # a real, non-empty map


def test_saliency_is_the_input_gradient(setup):
    config, model, layer, x, _ = setup
    column = config.abnormality_index("forearm")
    _, maps = explain(model, layer, x, lambda logits: column, ["saliency"])
    xg = x.clone().requires_grad_(True)
    model(xg)[0, column].backward()
    grad = xg.grad.abs().amax(1)[0].numpy()
    expected = np.clip(grad / np.percentile(grad, 99.5), 0, 1)
    assert np.abs(maps["saliency"] - expected).max() < 1e-5


def test_hooks_are_released_even_on_error(setup):
    _, model, layer, x, _ = setup
    before = count_hooks(model)
    explain(model, layer, x, lambda logits: 10, list(METHODS)[:6])
    assert count_hooks(model) == before

    def boom(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        explain(model, layer, x, boom, ["gradcam"])
    assert count_hooks(model) == before


def test_no_target_means_no_backward_and_no_maps(setup):
    config, model, layer, x, _ = setup
    logits, maps = explain(model, layer, x, lambda logits: None, ["gradcam"])
    assert maps == {} and logits.shape == (1, config.num_outputs)


def test_every_fast_method_gives_a_map(setup):
    config, model, layer, x, _ = setup
    fast = [m for m, spec in METHODS.items() if not spec.slow]
    _, maps = explain(model, layer, x, lambda logits: config.abnormality_index("wrist"), fast)
    assert set(maps) == set(fast)
    for cam in maps.values():
        assert cam.shape == (config.input_size, config.input_size) and np.isfinite(cam).all()


def test_batched_scorecam_equals_the_library_class():
    """ScoreCAM on timm's tiny test EfficientNet (a forward pass per channel is slow on the real one)."""
    torch.manual_seed(0)
    config = ModelConfig(architecture="test_efficientnet", input_size=96)
    model = create_model(config).eval()
    layer = model.get_submodule(config.cam_layer)
    x, _ = to_model_input(textured((300, 200)), config)
    column = config.abnormality_index("elbow")
    _, maps = explain(model, layer, x, lambda logits: column, ["scorecam"])
    with ScoreCAM(model, [layer]) as cam:  # all masked inputs at once, scored 16 at a time
        reference = cam(x, [ClassifierOutputTarget(column)])[0]
    assert maps["scorecam"].shape == (96, 96) and maps["scorecam"].max() > 0.5
    assert np.abs(maps["scorecam"] - reference).max() < 1e-4


def test_overlay_keeps_aspect_and_crops_padding(setup):
    config, _, _, _, box = setup
    cam = np.zeros((config.input_size, config.input_size), np.float32)
    cam[box.top : box.top + box.height, box.left : box.left + box.width] = 1.0  # hot exactly on the content
    out = overlay(textured((300, 200)), cam, box, opacity=1.0)
    assert out.shape == (200, 300, 3) and out.dtype == np.uint8
    # fully hot everywhere: the padding was cropped away, not stretched into the picture
    assert np.ptp(out.reshape(-1, 3), axis=0).max() <= 1


def test_backward_reaches_the_image_only_for_saliency(setup):
    """The CAMs need gradients at the explained layer alone; only saliency pays for a full backward pass."""
    config, model, layer, x, _ = setup
    stem_grads = []
    handle = model.backbone.conv_stem.register_full_backward_hook(lambda *args: stem_grads.append(1))
    try:
        explain(model, layer, x, lambda logits: config.abnormality_index("humerus"), ["gradcam", "gradcam++"])
        assert stem_grads == []
        explain(model, layer, x, lambda logits: config.abnormality_index("humerus"), ["gradcam", "saliency"])
        assert stem_grads == [1]
    finally:
        handle.remove()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # left as it was
