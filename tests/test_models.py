"""Registry, heads, freezing, Grad-CAM layers, offline pretrained weights and checkpoint loading."""

from __future__ import annotations

import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from xrai.config import TrainConfig
from xrai.models import weights as models
from xrai.models.factory import create_model, gradcam_layer
from xrai.models.pruning import count_nonzero, prune_synflow, restore_pruning
from xrai.models.registry import DEFAULT_MODEL, MODELS, list_models
from xrai.models.weights import PretrainedWeightsError
from xrai.runs.load import load_model

# The big ones get a smaller input so the whole file stays well under a minute on 2 CPU cores.
REAL_CAN_REACH = models._can_reach
HEAVY = {"densenet169", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "resnet50"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may download: any connectivity check or download fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(models, "_can_reach", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_registry_lists_every_model_default_first():
    assert list_models()[0] == DEFAULT_MODEL and sorted(list_models()) == sorted(MODELS)
    assert list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]
    assert list_models("efficientnet_lite*") == ["efficientnet_lite0"]
    for spec in MODELS.values():  # every pinned torchvision weights name resolves in this torchvision
        if spec.source == "wheel":
            continue
        assert torchvision.models.get_weight(spec.weights).url.startswith("https://")


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_runs_backward_and_has_a_gradcam_layer(name):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False)
    assert model.xrai_name == name
    layer = gradcam_layer(model)
    assert any(layer is module for module in model.backbone.modules())

    shapes = []
    handle = layer.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    size = 32 if name in HEAVY else 64
    out = model(torch.randn(2, 3, size, size))
    handle.remove()
    assert out.shape == (2, 1)
    assert len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][0] == 2

    out.sum().backward()
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert model.head[-1].weight.grad is not None


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "densenet169", "efficientnet_b0"])
def test_gradcam_layer_works_with_pytorch_grad_cam(name):
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_model(name, pretrained=False).eval()
    with grad_cam.GradCAM(model=model, target_layers=[gradcam_layer(model)]) as cam:
        maps = cam(input_tensor=torch.randn(1, 3, 64, 64), targets=[ClassifierOutputTarget(0)])
    assert maps.shape == (1, 64, 64) and torch.isfinite(torch.as_tensor(maps)).all()


def _densenet_cams(model, x, device):
    from xrai.explain.cam import CamExplainer

    with CamExplainer(model.to(device)) as explainer:
        return explainer(x.to(device), target_class=1)


@pytest.mark.parametrize("stored", ["shared", "copied"])
def test_densenet_gradcam_matches_an_explicit_clone_based_reference(stored, monkeypatch):
    """Grad-CAM on DenseNet = ReLU(sum_k mean(dlogit/dA_k) * A_k), A the ReLU'd norm5 map, computed here on a
    clone nothing can modify. grad-cam stores the target layer's output with `.cpu().detach()`: the very
    tensor on a CPU ("shared"), a copy on CUDA ("copied", emulated here). torchvision's forward ReLUs
    norm5's output in place after that, so the old norm5 target gave a different map in the copied case."""
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
    from pytorch_grad_cam.utils.image import scale_cam_image

    if stored == "copied":
        monkeypatch.setattr(ActivationsAndGradients, "save_activation",
                            lambda self, module, inputs, output: self.activations.append(output.detach().clone()))
    torch.manual_seed(0)
    model = create_model("densenet169", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    cams = _densenet_cams(model, x, "cpu")
    with torch.no_grad():
        features = model.backbone.features(x)
    a = torch.relu(features).clone().requires_grad_(True)
    logit = model.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(a, 1), 1))[:, 0]
    assert torch.allclose(logit, model(x)[:, 0], atol=1e-5)  # the reference is the model's own function
    (grads,) = torch.autograd.grad(logit.sum(), a)
    low = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * a).sum(1)).detach().numpy()
    expected = scale_cam_image(low, (64, 64))
    assert low.max() > 0 and cams.shape == expected.shape == (2, 64, 64)
    np.testing.assert_allclose(cams, expected, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_densenet_gradcam_is_the_same_on_cpu_and_cuda():
    torch.manual_seed(0)
    model = create_model("densenet169", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    cpu = _densenet_cams(model, x, "cpu")
    np.testing.assert_allclose(_densenet_cams(model, x, "cuda"), cpu, atol=2e-3)


def test_heads():
    linear = create_model("mobilenet_v2", pretrained=False)
    assert [type(m) for m in linear.head] == [nn.Linear]
    assert (linear.head[0].in_features, linear.head[0].out_features) == (1280, 1)

    dropped = create_model("mobilenet_v2", pretrained=False, dropout=0.3)
    assert [type(m) for m in dropped.head] == [nn.Dropout, nn.Linear] and dropped.head[0].p == 0.3

    mlp = create_model("resnet18", pretrained=False, head="mlp")
    assert [type(m) for m in mlp.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp.head[0].in_features, mlp.head[0].out_features) == (512, 256)
    assert mlp.head[2].p == 0.5 and mlp.head[3].out_features == 1

    v3 = create_model("mobilenet_v3_large", pretrained=False)  # keeps its pretrained 960 -> 1280 projection
    assert v3.head[0].in_features == 1280 and isinstance(v3.backbone.classifier[0], nn.Linear)

    with pytest.raises(ValueError, match="linear, mlp"):
        create_model("resnet18", pretrained=False, head="transformer")
    with pytest.raises(ValueError, match="dropout"):
        create_model("resnet18", pretrained=False, dropout=1.0)


def test_freeze_trains_the_head_alone_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = create_model("resnet18", pretrained=False, freeze=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("head.") for name in trainable)

    model.train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 64, 64) * 3 + 1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key

    unfrozen = create_model("resnet18", pretrained=False).train()
    assert all(p.requires_grad for p in unfrozen.parameters()) and unfrozen.backbone.training


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        create_model("resnet19", pretrained=False)
    message = str(error.value)
    assert "'resnet19'" in message and "did you mean 'resnet18'" in message
    for name in list_models():
        assert name in message


def test_pretrained_offline_fails_at_once_naming_the_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(models, "_can_reach", lambda url, timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as error:
        create_model("mobilenet_v2")
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert "MobileNet_V2_Weights.IMAGENET1K_V2" in message
    assert "pretrained=False" in message
    assert "mobilenet_v2-7ebf99e0.pth" in message and str(tmp_path / "checkpoints") in message


def test_pretrained_uses_a_cached_file_without_the_network(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("resnet18")  # _no_network makes any network use fail
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_a_failed_download_becomes_a_pretrained_weights_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(models, "_can_reach", lambda url, timeout=3.0: True)

    def fail(url, dst, *args, **kwargs):
        raise urllib.error.URLError("connection reset")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    with pytest.raises(PretrainedWeightsError, match="ResNet18_Weights.IMAGENET1K_V1.*connection reset"):
        create_model("resnet18")


def _wheelhouse_weights(tmp_path, monkeypatch, model="mobilenet_v2", file="mobilenet_v2-7ebf99e0.pth", seed=3,
                        sub="weights"):
    """A Kaggle-like input folder holding a wheelhouse dataset with one fake weights file and its SHA256SUMS;
    torch.hub's cache empty (in tmp_path)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "input"))
    monkeypatch.delenv(models.WEIGHTS_DIR_ENV, raising=False)
    folder = tmp_path / "input" / "datasets" / "me" / "xrai-wheelhouse" / sub
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    reference = getattr(torchvision.models, model)()
    torch.save(reference.state_dict(), folder / file)
    models.write_sums(folder)
    return folder, reference


@pytest.mark.parametrize("sub", ["weights", ""])  # "": the dataset's files uploaded flat
def test_pretrained_offline_takes_the_weights_from_an_attached_wheelhouse(monkeypatch, tmp_path, sub):
    folder, reference = _wheelhouse_weights(tmp_path, monkeypatch, sub=sub)
    model = create_model("mobilenet_v2")  # _no_network fails any connectivity check or download
    for name, tensor in reference.features.state_dict().items():
        assert torch.equal(model.backbone.features.state_dict()[name], tensor), name
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    assert cached.read_bytes() == (folder / cached.name).read_bytes()
    assert models.weights_record(MODELS["mobilenet_v2"]) == {
        "weights": "MobileNet_V2_Weights.IMAGENET1K_V2", "file": cached.name,
        "sha256": models.read_sums(folder)[cached.name]}


def test_weights_dir_env_points_at_a_wheelhouse(monkeypatch, tmp_path):
    folder, reference = _wheelhouse_weights(tmp_path, monkeypatch, "resnet18", "resnet18-f37072fd.pth")
    monkeypatch.setenv("XRAI_KAGGLE_INPUT", str(tmp_path / "nothing"))
    monkeypatch.setenv(models.WEIGHTS_DIR_ENV, str(folder.parent))  # the wheelhouse; its weights/ is found
    model = create_model("resnet18")
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_a_wheelhouse_weights_file_with_a_wrong_hash_fails_in_one_line(monkeypatch, tmp_path):
    folder, _ = _wheelhouse_weights(tmp_path, monkeypatch)
    (folder / "mobilenet_v2-7ebf99e0.pth").write_bytes(b"truncated")
    with pytest.raises(PretrainedWeightsError) as error:
        create_model("mobilenet_v2")
    message = str(error.value)
    assert "\n" not in message and str(folder / "mobilenet_v2-7ebf99e0.pth") in message and "sha256" in message
    assert not (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth").exists()


def test_a_model_missing_from_the_wheelhouse_fails_offline_naming_its_file(monkeypatch, tmp_path):
    folder, _ = _wheelhouse_weights(tmp_path, monkeypatch, "resnet18", "resnet18-f37072fd.pth")
    monkeypatch.setattr(models, "_can_reach", lambda url, timeout=3.0: False)
    with pytest.raises(PretrainedWeightsError) as error:
        create_model("mobilenet_v2")
    message = str(error.value)
    assert "\n" not in message and "mobilenet_v2-7ebf99e0.pth is not in the wheelhouse's weights folder" in message
    assert str(folder) in message and "python -m xrai wheelhouse --weights mobilenet_v2" in message


def test_connectivity_check_is_bounded(monkeypatch):
    # The real check, with no proxy in the way.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    assert REAL_CAN_REACH("https://xrai-test.invalid/weights.pth", timeout=0.5) is False
    # Unroutable: times out where it is black-holed; here an intercepting proxy answers with a
    # certificate for another name, which counts as unreachable too.
    assert REAL_CAN_REACH("https://10.255.255.1/weights.pth", timeout=0.5) is False
    assert time.perf_counter() - start < 3.0


def _fake_run(run_dir, model, config, which="best"):
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config.to_json(run_dir / "config.json")
    checkpoint = {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "model_name": config.model}
    torch.save(checkpoint, run_dir / "checkpoints" / f"{which}.pt")
    return run_dir


def test_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(model="mobilenet_v2", pretrained=False, head="mlp", dropout=0.2)
    model = create_model("mobilenet_v2", pretrained=False, head="mlp", dropout=0.2).eval()
    run = _fake_run(tmp_path / "run", model, config)

    loaded, loaded_config = load_model(run)
    assert loaded_config == config and loaded.xrai_name == "mobilenet_v2" and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert load_model(run / "checkpoints" / "best.pt")[1] == config  # a .pt path works too


def test_load_model_folds_a_pruned_model(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(model="mobilenet_v2", pretrained=False, prune_sparsity=0.9)
    model = create_model("mobilenet_v2", pretrained=False)
    prune_synflow(model, sparsity=0.9, iterations=5, input_shape=(1, 3, 32, 32), progress=False)
    model.eval()
    assert any(key.endswith("weight_mask") for key in model.state_dict())
    run = _fake_run(tmp_path / "run", model, config, which="last")

    loaded, _ = load_model(run, which="last")
    assert not any(key.endswith(("_orig", "_mask")) for key in loaded.state_dict())
    assert count_nonzero(loaded) == count_nonzero(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    # Resuming a pruned run: re-apply the masks, then the pruned state dict loads strictly.
    fresh = create_model("mobilenet_v2", pretrained=False)
    assert restore_pruning(fresh, model.state_dict()) == len([k for k in model.state_dict() if k.endswith("_mask")])
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert count_nonzero(fresh) == count_nonzero(model)


def test_load_model_missing_checkpoint_says_what_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_model(tmp_path / "empty-run")
    message = str(error.value)
    assert "empty-run" in message and "03_train" in message and "python -m xrai train" in message


def test_load_model_rejects_a_foreign_file(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(ValueError, match="not an xrai checkpoint"):
        load_model(tmp_path)
