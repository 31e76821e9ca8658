"""Several processes, one model: torchrun's environment, DistributedDataParallel and the collectives fit() needs.

torchrun (``python -m torch.distributed.run``) starts one process per device and tells each its place
in RANK, WORLD_SIZE and LOCAL_RANK, the variables torchvision's references/classification/utils.py
(``init_distributed_mode``) reads too. `init` turns them into a `Distributed` context. Without them (a
notebook kernel, plain ``python -m xrai train``) the context has world size 1 and every method below
hands its input back: fit() has one code path, and world size 1 is its plain case.

What fit() does with it:

- Each rank trains on a disjoint shard of every global batch (`xrai.data.batches.epoch_batches`, with
  rank and world size): the global batch is ``batch_size`` and each rank takes ``batch_size / world``.
- `wrap`: SyncBatchNorm (unless switched off), then DistributedDataParallel, which averages the
  gradients so every rank takes the same step.
- `main_first`: rank 0 fetches pretrained weights and builds the image cache, then the others reuse them.
- `gather_rows`: validation is sharded too; the logits of every rank are gathered, with their row
  index, so each rank computes the figures a single process would.
- `broadcast`: decisions (best checkpoint, early stop, the plateau scheduler) come from rank 0's figures.
- `is_main`: rank 0 alone writes checkpoints, history, config, trackers and the console progress.

Failures: torchrun stops every process of the group as soon as one exits with an error (its
``--max-restarts`` is 0 unless set), so a rank that raises ends the run; a rank that hangs is ended by
the process group's TIMEOUT.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from xrai.env import get_device, gpu_count
from xrai.errors import UserError, one_line

__all__ = ["TIMEOUT", "Distributed", "CpuSyncBatchNorm", "PeerFailedError", "convert_sync_batchnorm", "init",
           "teardown", "world_size_from_env"]

# How long a collective waits for the other ranks before the process group gives up. It must outlast
# what rank 0 does alone while the others wait: building the image cache (minutes on MURA), saving a
# checkpoint to a slow Google Drive mount. A rank that dies does not wait for it: torchrun ends the group.
TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


class PeerFailedError(UserError, RuntimeError):
    """Another rank failed; this one stops too. The message carries the other rank's error."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when it is not set (no torchrun)."""
    return _env_int("WORLD_SIZE", 1)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank, world size, local rank and the device it trains on."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo takes CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def wrap(self, model: nn.Module, *, sync_bn: bool = True) -> nn.Module:
        """DistributedDataParallel around the model (SyncBatchNorm first, when asked); the model itself alone."""
        if self.world_size == 1:
            return model
        if sync_bn:
            model = convert_sync_batchnorm(model, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model inside DistributedDataParallel (what checkpoints hold and validation runs)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj`, on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[Any], T], *, share: Callable[[T], Any] = lambda result: None) -> T:
        """Run fn on rank 0, then on the other ranks, which get what `share` took from rank 0's result.

        For work that must happen once (fetching pretrained weights, building the image cache): the
        others find rank 0's result. fn(None) runs on rank 0, fn(share(rank 0's result)) on the others.

        Raises:
            PeerFailedError: on the other ranks, when fn failed on rank 0 (rank 0 raises its own error).
        """
        if self.world_size == 1:
            return fn(None)
        if self.is_main:
            try:
                result = fn(None)
            except BaseException as error:
                self.broadcast(("failed", one_line(error)))
                raise
            self.broadcast(("ok", share(result)))
            return result
        status, shared = self.broadcast(None)
        if status != "ok":
            raise PeerFailedError(f"rank 0 failed ({shared}); rank {self.rank} stops too")
        return fn(shared)

    def gather_rows(self, positions: np.ndarray, *columns: Tensor) -> tuple[Tensor, ...]:
        """Every rank's rows of `columns`, in the order of their positions 0..n-1 (each rank holds a shard).

        The shards may differ in length (the last batch splits unevenly): each is padded to the longest,
        gathered, cut back and sorted by its row index, so the result is the whole split in manifest order.

        Raises:
            RuntimeError: the shards do not cover 0..n-1 exactly once (a sharding bug).
        """
        if self.world_size == 1:
            return columns
        where = self._comm_device
        local = torch.stack([torch.as_tensor(np.asarray(positions), dtype=torch.float64).to(where),
                             *(c.detach().reshape(-1).to(where, torch.float64) for c in columns)], 1)
        sizes = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=where))
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(counts), local.shape[1], dtype=torch.float64, device=where)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        rows = torch.cat([part[:count] for part, count in zip(parts, counts)])
        rows = rows[torch.argsort(rows[:, 0])]
        if not torch.equal(rows[:, 0], torch.arange(len(rows), dtype=torch.float64, device=where)):
            raise RuntimeError(f"the validation shards of {self.world_size} ranks do not cover rows 0..{len(rows) - 1} "
                               "exactly once")
        return tuple(rows[:, 1 + i].to(c.device, c.dtype) for i, c in enumerate(columns))

    def gatherer(self, batches: list[np.ndarray]) -> Callable[..., tuple[Tensor, ...]] | None:
        """validate()'s `gather` for an eval source's batch_positions(0): the columns of this rank's rows
        -> those of every rank's rows in order (`gather_rows`). None with one process."""
        if self.world_size == 1:
            return None
        rows = np.concatenate([np.zeros(0, dtype=np.int64), *batches])
        return functools.partial(self.gather_rows, rows)

    def reduce_train_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """train_one_epoch's figures over all ranks: the mean loss over every image, their count, the
        slowest rank's seconds (lr is the same everywhere)."""
        if self.world_size == 1:
            return stats
        where = self._comm_device
        sums = torch.tensor([stats["train_loss"] * stats["images"], stats["images"]], dtype=torch.float64,
                            device=where)
        slowest = torch.tensor([stats["seconds"]], dtype=torch.float64, device=where)
        dist.all_reduce(sums)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        images = float(sums[1].item())
        return {**stats, "train_loss": float(sums[0].item()) / max(1.0, images), "images": int(images),
                "seconds": float(slowest.item())}

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm's running statistics) to every rank.

        Without SyncBatchNorm each rank's running statistics follow its own shard; validation and the
        checkpoint then use rank 0's, as DistributedDataParallel does before every training forward.
        """
        if self.world_size == 1:
            return
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def rng_states(self, state: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every rank's RNG state (rank order) for the checkpoint; None with one process."""
        if self.world_size == 1:
            return None
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def own_rng_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The RNG state this rank resumes with: its own when the checkpoint holds one per rank of this
        world size, else the state of the checkpoint's rank 0."""
        states = checkpoint.get("rng_ranks")
        if states and len(states) == self.world_size:
            return states[self.rank]
        return checkpoint["rng"]


def init(device: str = "auto") -> Distributed:
    """This process's `Distributed` context, from torchrun's environment (world size 1 without it).

    With WORLD_SIZE > 1 the default process group is initialised here unless it already is: NCCL for
    CUDA devices (each rank on cuda:LOCAL_RANK), gloo for the CPU. Calling it again returns the same
    context. `teardown` ends the group.

    Args:
        device: the config's device: "auto" (CUDA when there), "cpu" or "cuda".
    Raises:
        ValueError: a device that cannot be shared out (cuda:N with several processes, more
            processes on this machine than GPUs), or torchrun variables that do not fit together.
    """
    world = world_size_from_env()
    if world == 1:
        return Distributed(device=get_device(device))
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", -1)
    if not (0 <= rank < world and local_rank >= 0):
        raise ValueError(f"torchrun's environment is inconsistent: RANK={os.environ.get('RANK')!r}, "
                         f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}, WORLD_SIZE={world}; start the run with "
                         "torchrun")
    target = _rank_device(device, local_rank)
    if not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)  # env://: MASTER_ADDR/PORT from torchrun
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"a process group of {dist.get_world_size()} is initialised, but WORLD_SIZE is {world}")
    return Distributed(device=target, rank=rank, world_size=world, local_rank=local_rank)


def teardown() -> None:
    """End the default process group if there is one (at the end of a successful run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def _rank_device(preference: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for "cuda" (and "auto" with GPUs), the CPU for "cpu" (and "auto" without)."""
    preference = (preference or "auto").strip().lower()
    if preference == "cpu":
        return torch.device("cpu")
    if preference not in ("auto", "cuda"):
        raise ValueError(f"device {preference!r} names one device, but each of several processes takes its own "
                         "(cuda:LOCAL_RANK); use device 'cuda', 'auto' or 'cpu'")
    count = gpu_count()
    if count == 0:
        if preference == "cuda":
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use device 'cpu' or 'auto'")
        return torch.device("cpu")
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} has no GPU: this machine shows {count}; start at most {count} "
                         "processes per machine (torchrun --nproc_per_node), or train on the CPU (device 'cpu')")
    return torch.device("cuda", local_rank)


# ---- SyncBatchNorm for CPU tensors (gloo) -------------------------------------------------------------


def _local_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of this rank's shard, in float64.

    `torch.batch_norm_update_stats` is the kernel BatchNorm's own training pass uses (12x faster than
    `torch.var_mean` over a channels_last activation of MobileNetV2 on one core, with BatchNorm's own
    accuracy).
    """
    mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    return mean.double(), var.double()


class _SyncBatchNormCpu(torch.autograd.Function):
    """Batch normalisation with the statistics of every rank's shard, for CPU tensors over gloo.

    The same arithmetic as torch's SyncBatchNorm (whose kernels are CUDA only), with PyTorch's native
    CPU kernels doing every pass over the activations: forward, one pass for this rank's statistics (`_local_stats`),
    one all_reduce of the per-channel sums (float64), one `batch_norm` with the global statistics;
    backward, one `native_batch_norm_backward` in eval mode (which gives g * w * invstd and this rank's
    sums of g and g * x_hat), one all_reduce of those sums, and one fused correction. Building it from
    autograd ops instead (sums, squares, a multiply-add) cost 2.5x a plain BatchNorm step on
    MobileNetV2; the gradient is the global batch's either way.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group,
                world_size: int):
        channels = input.shape[1]
        count = input.numel() // max(1, channels)
        mean, var = _local_stats(input.detach())
        stats = torch.cat([mean * count, (var + mean * mean) * count,
                           torch.tensor([float(count)], dtype=torch.float64)])
        if world_size > 1:
            dist.all_reduce(stats, group=group)
        total = float(stats[2 * channels])
        if total <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(total)} over all ranks")
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
        mean_f, var_f = mean.to(input.dtype), var.to(input.dtype)
        out = F.batch_norm(input, mean_f, var_f, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(input, weight, mean_f, var_f)
        ctx.eps, ctx.group, ctx.world_size, ctx.total, ctx.has_bias = eps, group, world_size, total, bias is not None
        total_t = stats[2 * channels :].clone()
        ctx.mark_non_differentiable(mean, var, total_t)
        return out, mean, var, total_t

    @staticmethod
    def backward(ctx, grad_out: Tensor, _mean, _var, _total):
        input, weight, mean, var = ctx.saved_tensors
        channels = input.shape[1]
        w = weight if weight is not None else torch.ones(channels, dtype=input.dtype)
        grad_eval, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        sums = torch.cat([sum_g, sum_g_xhat]).double()
        if ctx.world_size > 1:
            dist.all_reduce(sums, group=ctx.group)
        # d/dx of the global batch's BatchNorm: w * invstd * (g - sum(g)/N - x_hat * sum(g * x_hat)/N),
        # = grad_eval - a * x - b per channel, with the sums over every rank and N the global count.
        invstd = torch.rsqrt(var.double() + ctx.eps)
        wd = w.detach().double()
        a = wd * invstd * invstd * sums[channels:] / ctx.total
        b = wd * invstd * sums[:channels] / ctx.total - a * mean.double()
        shape = [1, channels] + [1] * (input.dim() - 2)
        grad_input = grad_eval.sub_(b.to(input.dtype).view(shape)).addcmul_(input, a.to(input.dtype).view(shape),
                                                                             value=-1.0)
        grad_weight = sum_g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU tensors over gloo: batch statistics over every rank's shard of the batch.

    torch's SyncBatchNorm synchronises CUDA inputs only (its statistics come from a CUDA kernel,
    ``torch.batch_norm_stats``, and DistributedDataParallel refuses it on a CPU). This adds up the
    per-channel sums over the ranks with an all_reduce (float64) in the forward pass and the gradient's
    sums in the backward pass (`_SyncBatchNormCpu`), so a CPU run (the tests, a CPU-only cluster)
    normalises and back-propagates as one process with the whole global batch would; the parameters'
    own gradients stay per rank, for DistributedDataParallel to average. In eval mode, or without a
    process group, it is plain BatchNorm; any input of (N, C, ...) is taken, as BatchNorm1d/2d/3d each
    take theirs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group  # None: every rank

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked.item())
        group = self.process_group or dist.group.WORLD
        out, mean, var, total = _SyncBatchNormCpu.apply(input, self.weight, self.bias, self.eps, group,
                                                 dist.get_world_size(group))
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """Every BatchNorm layer of `module` synchronised over the ranks: torch's SyncBatchNorm on CUDA,
    `CpuSyncBatchNorm` on the CPU. Parameters and buffers are shared, and state_dict keys stay the same,
    so checkpoints load into the plain model."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BATCH_NORMS) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child, process_group))
    return out
