"""GpuAugment and preprocess: shapes, dtype, ranges, determinism, and that eval = a plain centre crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD, GpuAugment, preprocess
from xrai.data.decode.images import letterbox

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _batch(b=4, s=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, s, s), dtype=torch.uint8, generator=g)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(5, 1, 40, 40), (5, 40, 40)])
def test_shapes_dtype_and_range(train, shape):
    x = _batch(5, 40).reshape(shape)
    out = GpuAugment(32, train=train)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    pixels = _unnormalise(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # normalised from [0, 1]
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)


def test_rejects_wrong_input():
    aug = GpuAugment(16, train=False)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 1, 20, 20))
    with pytest.raises(ValueError, match="square"):
        aug(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))


def test_train_is_deterministic_given_the_generator():
    x = _batch()
    aug = GpuAugment(32, train=True)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # per-sample: the images of one batch get different parameters
    same = _batch(4, 40).repeat(1, 1, 1, 1)[:1].repeat(4, 1, 1, 1)
    out = aug(same, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("side,crop", [(40, 32), (41, 32), (73, 64), (30, 32)])
def test_eval_is_torchvisions_centre_crop(side, crop):
    from torchvision.transforms.v2 import functional as TF

    x = _batch(3, side)
    expected = TF.center_crop(x, [crop, crop]).float() / 255  # pads with black when side < crop
    out = GpuAugment(crop, train=False)(x)
    assert torch.allclose(_unnormalise(out)[:, :1], expected, atol=1e-5)
    # the generator changes nothing in eval
    assert torch.equal(out, GpuAugment(crop, train=False)(x, generator=torch.Generator().manual_seed(3)))


def test_flip_is_a_mirror_and_crop_box_maps_exactly():
    x = _batch(2, 32)
    kw = dict(train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, brightness=0.0, contrast=0.0)
    plain = GpuAugment(32, flip_p=0.0, **kw)(x, generator=torch.Generator().manual_seed(0))
    flipped = GpuAugment(32, flip_p=1.0, **kw)(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_unnormalise(plain)[:, :1], x.float() / 255, atol=1e-5)  # full box, same size: a copy
    assert torch.allclose(flipped, torch.flip(plain, dims=[-1]), atol=1e-5)


def test_rotation_by_a_quarter_turn_is_rot90():
    x = _batch(1, 16).float() / 255
    f64 = torch.float64
    params = {"box": torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=f64), "flip": torch.ones(1, dtype=f64),
              "angle": torch.tensor([math.pi / 2], dtype=f64)}
    theta = GpuAugment.affine(params, 16).float()
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))


def test_jitter_stays_within_its_factors():
    x = torch.full((64, 1, 24, 24), 100, dtype=torch.uint8)
    kw = dict(train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, flip_p=0.0, contrast=0.0)
    out = _unnormalise(GpuAugment(24, brightness=0.2, **kw)(x, generator=torch.Generator().manual_seed(0)))
    factors = out[:, 0].mean(dim=(1, 2)) / (100 / 255)
    assert factors.min() >= 0.8 - 1e-4 and factors.max() <= 1.2 + 1e-4 and factors.std() > 0.01


def test_preprocess_is_letterbox_plus_eval_branch():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 60), dtype=np.uint8), rng.integers(0, 256, (50, 120), dtype=np.uint8)]
    out = preprocess(images, image_size=56, resize_size=64, device="cpu")
    assert out.shape == (2, 3, 56, 56) and out.dtype == torch.float32
    boxed = torch.from_numpy(np.stack([letterbox(im, 64) for im in images])).unsqueeze(1)
    assert torch.equal(out, GpuAugment(56, train=False)(boxed))
    assert preprocess(images[0], image_size=56, resize_size=64, device="cpu").shape == (1, 3, 56, 56)


def test_eval_agrees_with_the_classic_path(tmp_path):
    import pandas as pd
    from PIL import Image

    from xrai.data.dataset import ClassicBatches
    from xrai.data.decode.images import read_image

    rng = np.random.default_rng(1)
    paths = []
    for i, shape in enumerate([(90, 60), (61, 130)]):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    manifest = pd.DataFrame({"path": paths, "label": [0, 1]})
    classic = ClassicBatches(manifest, image_size=56, resize_size=64, batch_size=2, train=False, seed=0,
                             num_workers=0, device="cpu", progress=False)
    ours = preprocess([read_image(p) for p in paths], image_size=56, resize_size=64, device="cpu")
    assert torch.equal(next(classic.epoch(0))[0], ours)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _batch(4, 40)
    aug = GpuAugment(32, train=True)
    cpu = aug(x, generator=torch.Generator().manual_seed(5))
    gpu = aug.to("cuda")(x.cuda(), generator=torch.Generator().manual_seed(5)).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
