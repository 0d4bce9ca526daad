"""A body-part pair (one network per head) and the int8 storage that keeps two networks within the budget.

These run on freshly built networks and synthetic inputs: no shared data, no trained weights needed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLED, needs_weights
from safetensors.torch import load_file, save_file

from mura_demo.cli import main
from mura_demo.core.config import WEIGHTS_NAME, ModelConfig
from mura_demo.core.inference import model_logits, score_body_parts
from mura_demo.core.model import BodyPartPair, MuraNet, create_model
from mura_demo.core.weights import (
    SCALE_SUFFIX,
    WeightsError,
    load_folder,
    round_as_stored,
    save_weights,
)
from mura_demo.training.card import reproduce_story


def pair_config(**changes) -> ModelConfig:
    return ModelConfig(input_size=64, separate_body_part_network=True, cam_layer="abnormality.backbone.bn2",
                       trained=True, **changes)  # fmt: skip


@pytest.fixture(scope="module")
def pair() -> BodyPartPair:
    torch.manual_seed(0)
    model = create_model(pair_config())
    with torch.no_grad():  # heads that answer differently, so that mixing them up would show
        for head in (model.body_part.abnormality_head, model.abnormality.body_part_head):
            head.weight.normal_(std=1.0)
    return model.eval()


def test_each_head_is_answered_by_its_own_network(pair):
    x = torch.randn(2, 3, 64, 64)
    config = pair.config
    with torch.no_grad():
        row = model_logits(pair, config, x)
        body, _ = config.split_logits(pair.body_part(x))
        _, abnormal = config.split_logits(pair.abnormality(x))
        assert config.split_logits(pair(x))[0].isnan().all()  # the pair's own pass leaves the body part out
    assert torch.allclose(row, torch.cat([body, abnormal], 1), atol=1e-5)
    assert isinstance(pair.body_part, MuraNet) and pair.abnormality_head is pair.abnormality.abnormality_head
    # routing on the body part runs the body-part network alone
    ran = []
    handles = [net.backbone.register_forward_hook(lambda _m, _a, _o, n=name: ran.append(n))
               for name, net in (("body_part", pair.body_part), ("abnormality", pair.abnormality))]  # fmt: skip
    try:
        images = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
        score_body_parts(pair, config, images)
        assert set(ran) == {"body_part"}
        ran.clear()
        model_logits(pair, config, x)
        assert set(ran) == {"body_part", "abnormality"}
    finally:
        for handle in handles:
            handle.remove()
    # an abnormality logit's gradient (what every map explains) reaches the abnormality network only
    x.requires_grad_(True)
    pair.zero_grad()
    for p in pair.parameters():
        p.requires_grad_(True)
    pair(x)[:, config.abnormality_index("forearm")].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in pair.body_part.parameters())
    assert any(p.grad is not None and p.grad.any() for p in pair.abnormality.parameters())
    assert x.grad.abs().sum() > 0


def test_a_pair_s_maps_are_its_abnormality_network_s(pair):
    """The shared pass explains the pair's abnormality logit as the library's own classes do; the methods that
    run passes of their own run the abnormality network alone, with the same answer."""
    from pytorch_grad_cam import EigenCAM, GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mura_demo.core.explain import explain

    x = torch.randn(1, 3, 64, 64)
    column = pair.config.abnormality_index("humerus")
    layer = pair.get_submodule(pair.config.cam_layer)
    logits, maps = explain(pair, layer, x, lambda _logits: column, ("gradcam", "eigencam"))
    with torch.no_grad():
        assert torch.allclose(logits, pair(x), atol=1e-5, equal_nan=True)
    for method, cls in (("gradcam", GradCAM), ("eigencam", EigenCAM)):
        with cls(pair, [layer]) as cam:
            expected = cam(x, [ClassifierOutputTarget(column)])[0]
        assert abs(maps[method] - expected).max() < 1e-4, method


def test_a_pair_is_made_of_trained_networks_and_explains_its_abnormality_network():
    with pytest.raises(ValueError, match="train each alone"):
        create_model(pair_config(), imagenet_init="pypi")
    with pytest.raises(ValueError, match="explains its abnormality network"):
        ModelConfig.from_dict(pair_config().to_dict() | {"cam_layer": "body_part.backbone.bn2"})


def test_int8_storage_is_small_strict_and_what_was_scored(pair, tmp_path):
    """int8 keeps the wide weights in a quarter of float32's bytes; loading gives back exactly the numbers
    ``round_as_stored`` scored, and storing those again stores the same file."""
    half, int8 = tmp_path / "half", tmp_path / "int8"
    save_weights(pair, pair.config, half)
    save_weights(pair, pair.config, int8, int8=True)
    assert (int8 / WEIGHTS_NAME).stat().st_size < 0.6 * (half / WEIGHTS_NAME).stat().st_size
    tensors = load_file(int8 / WEIGHTS_NAME)
    wide = "abnormality.backbone.conv_head.weight"
    assert tensors[wide].dtype == torch.int8 and tensors[wide + SCALE_SUFFIX].shape == (tensors[wide].shape[0],)
    assert tensors["abnormality.backbone.conv_stem.weight"].dtype == torch.float16  # 27 weights a filter: kept
    loaded, _ = load_folder(int8)
    rounded = create_model(pair.config)
    rounded.load_state_dict(pair.state_dict())
    round_as_stored(rounded, int8=True)
    for key, value in rounded.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = tmp_path / "again"
    save_weights(loaded, pair.config, again, int8=True)
    assert all(torch.equal(v, load_file(again / WEIGHTS_NAME)[k]) for k, v in tensors.items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), rounded.eval()(x), atol=1e-5, equal_nan=True)  # channels-last: same


def test_int8_tensors_without_their_scales_are_refused(pair, tmp_path):
    save_weights(pair, pair.config, tmp_path, int8=True)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    wide = "body_part.backbone.conv_head.weight"
    tensors.pop(wide + SCALE_SUFFIX)
    tensors["body_part.backbone.bn2.bias" + SCALE_SUFFIX] = torch.ones(1)
    tensors["abnormality.backbone.conv_head.weight" + SCALE_SUFFIX] = torch.ones(3)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(WeightsError) as err:
        load_folder(tmp_path)
    message = str(err.value)
    assert f"missing: {wide}{SCALE_SUFFIX}" in message
    assert f"unexpected: body_part.backbone.bn2.bias{SCALE_SUFFIX}" in message
    assert f"wrong shape: abnormality.backbone.conv_head.weight{SCALE_SUFFIX}" in message


def test_only_a_pair_s_body_part_network_has_a_size_of_its_own():
    """A letterbox of the body part's own is a pair's (its networks trained at two sizes), and the body part's coarser
    view is resized from that letterbox, never above it."""
    assert pair_config(body_part_letterbox_size=48).body_part_image_size == 48
    assert pair_config().body_part_image_size == 64
    with pytest.raises(ValueError, match="body_part_letterbox_size is for a pair"):
        ModelConfig.from_dict(ModelConfig(input_size=64).to_dict() | {"body_part_letterbox_size": 48})
    with pytest.raises(ValueError, match=r"body_part_input_size must lie in \[32, 48\]"):
        ModelConfig.from_dict(pair_config(body_part_letterbox_size=48).to_dict() | {"body_part_input_size": 64})


def test_the_body_part_gets_a_pass_of_its_own_only_where_its_reading_needs_one():
    """The model input's own pass answers the body part unless the reading needs another image (a coarser view),
    another network (a pair) or the equalised view alone; then the body part comes from a pass of its own."""
    assert not ModelConfig(input_size=64).body_part_own_pass
    assert not ModelConfig(input_size=64, body_part_input_size=64).body_part_own_pass
    assert not ModelConfig(input_size=64, body_part_equalized_view=True).body_part_own_pass  # the input's, averaged
    assert ModelConfig(input_size=64, body_part_input_size=48).body_part_own_pass
    assert ModelConfig(input_size=64, body_part_equalized_input=True).body_part_own_pass
    assert pair_config().body_part_own_pass
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    cases = (({}, False), ({"body_part_input_size": 48}, True), ({"body_part_equalized_input": True}, True))
    for changes, own in cases:
        config = ModelConfig(input_size=64, **changes)
        model = create_model(config).eval()
        with torch.no_grad():
            body_part = config.split_logits(model_logits(model, config, x))[0]
            from_input = config.split_logits(model(x))[0]
        assert torch.equal(body_part, from_input) != own, changes


@needs_weights
def test_split_writes_each_network_of_a_pair_as_the_pair_stores_it(tmp_path):
    """`split`: the bundled pair's two networks as folders of their own, each tensor the pair's (int8 and scales
    alike) and each config its network's own before the pairing; a single network is refused."""
    stored = load_file(BUNDLED / WEIGHTS_NAME)
    record = load_folder(BUNDLED)[1].training["paired"]
    assert main(["split", str(BUNDLED), "--out-dir", str(tmp_path)]) == 0
    for role in ("body_part", "abnormality"):
        alone = load_file(tmp_path / role / WEIGHTS_NAME)
        assert alone.keys() == {k.removeprefix(f"{role}.") for k in stored if k.startswith(f"{role}.")}
        assert all(torch.equal(alone[k], stored[f"{role}.{k}"]) for k in alone)
        model, config = load_folder(tmp_path / role)
        assert isinstance(model, MuraNet) and not config.separate_body_part_network
        split_from = {"folder": str(BUNDLED), "version": load_folder(BUNDLED)[1].version}
        assert config.version == record[role]["version"]
        assert config.input_size == record[role]["training"]["settings"]["input_size"]  # the size it was trained at
        assert config.training == record[role]["training"] | {"split_from": split_from}
    # a run that starts from a half tells how the half was taken out of its pair
    start = {"folder": str(tmp_path / "abnormality"), "version": config.version, "training": config.training}
    story = reproduce_story({"settings": {"init_from": start["folder"]}, "started_from": start})
    assert f"`python -m mura_demo split {BUNDLED} --out-dir {tmp_path}`" in story
    assert main(["split", str(tmp_path / "abnormality"), "--out-dir", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()
