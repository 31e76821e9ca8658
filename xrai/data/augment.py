"""Batched augmentation on the device: uint8 grey batches -> normalised 3-channel float, train and eval alike.

The one definition of the training recipe's augmentation, on both input paths: the cached path feeds it
rows of the memmap, the classic path the same letterboxed uint8 pixels decoded from the files, batch by
batch, with the same random stream (`xrai.data.batches`). One module does train and eval: training
samples a random crop box, flip, rotation and intensity jitter per image; evaluation is the same module's
centre crop (an integer copy) with the same normalisation, so train and eval preprocessing cannot drift
apart, and the numpy contract of the ONNX server (`xrai.data.contract`) matches eval to 1e-6.
`preprocess` wraps the eval branch for single images (the app, CLI predict, Grad-CAM).

Why our own and not kornia (kornia 0.9; measured on this 2-core CPU, batch 64, 256 -> 224 px, the
same five ops): kornia's AugmentationSequential(RandomResizedCrop, RandomHorizontalFlip, RandomRotation,
RandomBrightness, RandomContrast) resamples the batch once per geometric op and keeps per-op
bookkeeping; folding crop box, flip and rotation into one 2x3 matrix per image and one `grid_sample`
resamples once, so it blurs less and runs ~2x faster (1,650 vs 740 img/s). On a GPU both are a
handful of memory-bound kernels (well under a millisecond per batch on a T4, against ~100 ms for the
training step), so speed there is a wash; the single pass still does less work. The deciding reason is
resume exactness: kornia draws its parameters from torch's *global* RNG (torch.distributions) and takes
no `generator=`, so an exact resume would need the global RNG reseeded around every call (fork_rng on
every device). Here every random number comes from an explicit `torch.Generator` the loader seeds
from (seed, epoch), drawn on the CPU, so the parameters are identical on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BASE_DEGREES", "BASE_JITTER", "IMAGENET_MEAN", "IMAGENET_STD", "GpuAugment", "augment_options",
           "preprocess"]

from xrai.data.contract import IMAGENET_MEAN, IMAGENET_STD, centre_crop_offset, model_normalisation
from xrai.data.decode.images import fit_square

# aug_strength 1 (TrainConfig): rotation within +-10 degrees, brightness and contrast factors in 1 +- 0.2.
BASE_DEGREES, BASE_JITTER = 10.0, 0.2


def augment_options(*, crop_scale: float = 0.7, aug_strength: float = 1.0, model: str = "") -> dict:
    """GpuAugment's options for a recipe: crops of ``crop_scale``..1 of the area, rotation and intensity
    jitter scaled by ``aug_strength`` (0: crop and flip only), and ``model``'s input normalisation."""
    if not 0 <= aug_strength * BASE_JITTER < 1:
        raise ValueError(f"aug_strength must be in [0, {1 / BASE_JITTER:g}), got {aug_strength}")
    return {"scale": (float(crop_scale), 1.0), "degrees": BASE_DEGREES * aug_strength,
            "brightness": BASE_JITTER * aug_strength, "contrast": BASE_JITTER * aug_strength,
            **model_normalisation(model)}


class GpuAugment(nn.Module):
    """uint8 (B,1,S,S) or (B,S,S) on any device -> float32 (B,3,image_size,image_size), normalised with
    ``mean`` and ``std`` (ImageNet's by default; the model's, ``xrai.data.contract.model_normalisation``).

    Train: per image a random resized crop (area `scale`, aspect `ratio`, as torchvision's
    RandomResizedCrop), a horizontal flip (p=0.5), a rotation within +-`degrees` and brightness and
    contrast jitter (factors in 1 +- `brightness` / `contrast`, as torchvision's ColorJitter), all in
    one bilinear resampling. Eval: a centre crop of `image_size` (torchvision's CenterCrop, which pads
    with black when the input is smaller), nothing random.

    Args:
        image_size: output side.
        train: random augmentation on (True) or the deterministic centre crop (False).
        scale, ratio, degrees, flip_p, brightness, contrast: the training ranges.
        mean, std: per-channel normalisation of x / 255 after grey is copied to 3 channels.
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        degrees: float = BASE_DEGREES,
        flip_p: float = 0.5,
        brightness: float = BASE_JITTER,
        contrast: float = BASE_JITTER,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.image_size = int(image_size)
        self.train_mode = bool(train)  # not nn.Module.training: .eval() on a model must not turn this off
        self.scale, self.ratio = scale, ratio
        self.degrees, self.flip_p = float(degrees), float(flip_p)
        self.brightness, self.contrast = float(brightness), float(contrast)
        # Grey -> 3 channels and the normalisation in one multiply-add: out_c = x * a_c + b_c.
        mean, std = torch.tensor(tuple(mean), dtype=torch.float32), torch.tensor(tuple(std), dtype=torch.float32)
        self.register_buffer("_mul", (1.0 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_add", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, train={self.train_mode}"

    def sample_params(self, batch: int, side: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-image parameters on the CPU (float64): crop box (x0, y0, w, h in input pixels), flip sign,
        angle (radians), brightness and contrast factors. Eval gives the centre crop and neutral values
        (forward itself takes `_centre_crop` in eval and never asks)."""
        n = batch
        if not self.train_mode:
            offset = float(centre_crop_offset(side, self.image_size))
            size = float(self.image_size)
            box = torch.tensor([offset, offset, size, size], dtype=torch.float64).repeat(n, 1)
            ones = torch.ones(n, dtype=torch.float64)
            return {"box": box, "flip": ones, "angle": torch.zeros(n, dtype=torch.float64),
                    "brightness": ones, "contrast": ones}

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low

        area = uniform(*self.scale) * side * side
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        # torchvision retries until the box fits, then falls back; clamping to the image is the batched
        # equivalent (it only bites for extreme aspect at scale ~1).
        w = torch.sqrt(area * aspect).clamp(max=side)
        h = torch.sqrt(area / aspect).clamp(max=side)
        x0 = uniform(0.0, 1.0) * (side - w)
        y0 = uniform(0.0, 1.0) * (side - h)
        flip = torch.where(uniform(0.0, 1.0) < self.flip_p, -1.0, 1.0).to(torch.float64)
        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        bright = uniform(1 - self.brightness, 1 + self.brightness)
        contr = uniform(1 - self.contrast, 1 + self.contrast)
        return {"box": torch.stack([x0, y0, w, h], 1), "flip": flip, "angle": angle,
                "brightness": bright, "contrast": contr}

    @staticmethod
    def affine(params: dict[str, Tensor], side: int) -> Tensor:
        """The (B,2,3) matrices for F.affine_grid (align_corners=False) that crop, flip and rotate at once.

        An output point u in [-1,1] sits u*w/2 pixels from the box centre c; rotating and flipping that
        offset and adding c gives the input point, which grid_sample wants as (2*x/side - 1).
        """
        x0, y0, w, h = params["box"].unbind(1)
        cos, sin, flip = torch.cos(params["angle"]), torch.sin(params["angle"]), params["flip"]
        sx, sy = w / side * flip, h / side
        theta = torch.stack(
            [
                torch.stack([sx * cos, -sy * sin, 2 * (x0 + w / 2) / side - 1], 1),
                torch.stack([sx * sin, sy * cos, 2 * (y0 + h / 2) / side - 1], 1),
            ],
            1,
        )
        return theta

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Augment (train) or centre-crop (eval) a uint8 batch.

        Args:
            images: uint8 (B,1,S,S) or (B,S,S), on the device where the work should happen.
            generator: a CPU torch.Generator for the random parameters (train only); None uses the
                global RNG, which breaks exact resume, so the loaders always pass one.
        """
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"GpuAugment wants square grey uint8 (B,1,S,S) or (B,S,S), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"GpuAugment wants uint8 images (the cache's dtype), got {images.dtype}")
        batch, side = images.shape[0], images.shape[-1]
        if not self.train_mode:
            return self._centre_crop(images)
        device = images.device
        params = self.sample_params(batch, side, generator)
        theta = self.affine(params, side).to(dtype=torch.float32)
        bright = params["brightness"].to(torch.float32).view(-1, 1, 1, 1)
        if device.type == "cuda":  # a few hundred bytes; pinned so the copies do not stall the host
            theta, bright = theta.pin_memory(), bright.pin_memory()
        theta = theta.to(device, non_blocking=True)
        bright = bright.to(device, non_blocking=True)
        # Brightness is folded into the uint8 -> [0,1] conversion (one pass instead of two); scaling
        # before rather than after the bilinear resampling differs only where clipping bites.
        x = images.to(torch.float32).mul_(bright / 255.0).clamp_(0.0, 1.0)
        # Bilinear without antialias: train crops are 0.7-1.0 of the area, so the scale factor stays
        # within ~0.7-1.3 and aliasing is negligible. (Eval never comes here: see _centre_crop.)
        x = F.grid_sample(x, _affine_grid(theta, self.image_size), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        if self.contrast > 0:
            c = params["contrast"].to(torch.float32).view(-1, 1, 1, 1).to(device, non_blocking=True)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)  # ColorJitter: blend with the image's mean grey
            x.mul_(c).add_(mean * (1 - c)).clamp_(0.0, 1.0)
        return torch.addcmul(self._add, x, self._mul)  # grey -> 3 normalised channels, one kernel

    def _centre_crop(self, images: Tensor) -> Tensor:
        """Eval: the centre crop as an integer copy (zero-padded when the input is smaller), normalised.

        Not grid_sample: its float32 grid lands up to ~1e-4 px off the pixel centres at sides that are
        not powers of two (146 -> 128), which blurred eval by up to 5e-5 and parted it from the numpy
        contract the ONNX server uses (``xrai.data.contract.prepare``, same arithmetic to 1e-6).
        """
        side, size = images.shape[-1], self.image_size
        offset = centre_crop_offset(side, size)
        crop = images.new_zeros((images.shape[0], 1, size, size))
        src = images[..., max(0, offset) : offset + size, max(0, offset) : offset + size]
        pad = max(0, -offset)
        crop[..., pad : pad + src.shape[-2], pad : pad + src.shape[-1]] = src
        x = crop.to(torch.float32).mul_(1.0 / 255.0)
        return torch.addcmul(self._add, x, self._mul)


def _affine_grid(theta: Tensor, size: int) -> Tensor:
    """F.affine_grid(theta, (B,1,size,size), align_corners=False), as two broadcast multiply-adds.

    Same numbers (to float rounding), but 3-4x faster on a CPU, where affine_grid's batched matmul over
    (B, size*size, 3) dominates the whole augmentation; on a GPU both are a couple of tiny kernels.
    """
    batch = theta.shape[0]
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    u, v = base.view(1, 1, size), base.view(1, size, 1)
    t = theta.reshape(batch, 6, 1, 1)
    grid = torch.empty(batch, size, size, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # x then y: t[k,0]*u + t[k,1]*v + t[k,2]
        torch.addcmul(t[:, 3 * k + 2] + t[:, 3 * k + 1] * v, t[:, 3 * k], u, out=grid[..., k])
    return grid


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    image_size: int,
    resize_size: int,
    device: torch.device | str = "cpu",
    resize: str = "letterbox",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Single-image inference input: fit each uint8 (H,W) image to a `resize_size` square (`resize`:
    letterbox or stretch, the run's TrainConfig.resize), then the eval branch of GpuAugment (centre crop
    to `image_size`, normalised with `mean` and `std`: the model's), exactly as the cached and classic
    eval paths.

    Returns:
        float32 (B,3,image_size,image_size) on `device`.
    """
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess got no images")
    boxed = np.stack([fit_square(np.asarray(im, dtype=np.uint8), resize_size, resize) for im in images])
    batch = torch.from_numpy(boxed).unsqueeze(1).to(device)
    augment = GpuAugment(image_size, train=False, mean=mean, std=std).to(device)
    return augment(batch)
