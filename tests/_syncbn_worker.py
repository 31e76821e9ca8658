"""One rank of tests/test_distributed.py's SyncBatchNorm check (CPU, gloo).

python -m xrai.train.launcher --standalone --nproc_per_node 2 tests/_syncbn_worker.py OUT.json

Each rank runs xrai's CpuSyncBatchNorm on its shard of a few fixed batches (float32), with the loss
sum(out * G) for a fixed G, so the global loss is the sum of the ranks' losses. Rank 0 gathers every
rank's outputs, input gradients, parameter gradients and running statistics and writes, per case, the
largest difference from one plain BatchNorm in float64 over the whole batch.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from xrai.train.distributed import CpuSyncBatchNorm

# name: (shape of the global batch, images on each rank, affine)
CASES = {
    "2d channels_last": ((8, 6, 5, 7), (4, 4), True),
    "uneven shards": ((8, 6, 5, 7), (3, 5), True),
    "(N, C) input": ((12, 5), (6, 6), True),
    "not affine": ((6, 4, 3, 3), (3, 3), False),
}


def _case(shape, split, affine, rank):
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(split))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 2
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.uniform_(-0.5, 0.5, generator=gen)
    sync = CpuSyncBatchNorm(shape[1], affine=affine)
    sync.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    start = sum(split[:rank])
    mine = x[start : start + split[rank]].float()
    if len(shape) == 4:
        mine = mine.contiguous(memory_format=torch.channels_last)
    mine.requires_grad_(True)
    out = sync(mine)
    (out.double() * g[start : start + split[rank]]).sum().backward()
    local = {"out": out.detach().double(), "grad_x": mine.grad.double(),
             "grad_w": sync.weight.grad.double() if affine else None,
             "grad_b": sync.bias.grad.double() if affine else None,
             "running_mean": sync.running_mean.double(), "running_var": sync.running_var.double()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if rank != 0:
        return None
    xr = x.clone().requires_grad_(True)
    (ref(xr) * g).sum().backward()
    want = {"grad_x": xr.grad, "running_mean": ref.running_mean, "running_var": ref.running_var}
    with torch.no_grad():
        want["out"] = nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
    got = {"out": torch.cat([r["out"] for r in gathered]), "grad_x": torch.cat([r["grad_x"] for r in gathered]),
           "running_mean": gathered[0]["running_mean"], "running_var": gathered[0]["running_var"]}
    if affine:  # DistributedDataParallel adds the ranks' parameter gradients up (and divides by the world size)
        want["grad_w"], want["grad_b"] = ref.weight.grad, ref.bias.grad
        got["grad_w"] = sum(r["grad_w"] for r in gathered)
        got["grad_b"] = sum(r["grad_b"] for r in gathered)
    same_stats = all(torch.equal(r["running_mean"], gathered[0]["running_mean"]) for r in gathered)
    diffs = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)) for k in want}
    return {"relative_diff": diffs, "ranks_agree": same_stats}


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {name: _case(*spec, rank) for name, spec in CASES.items()}
    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
