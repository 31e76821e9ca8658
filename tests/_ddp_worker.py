"""One rank of tests/test_distributed.py's torchrun runs: `python -m xrai train` with test hooks.

python -m xrai.train.launcher --standalone --nproc_per_node 2 tests/_ddp_worker.py [HOOKS] -- TRAIN ARGS [-- TRAIN ARGS]...

Hooks (each rank installs them, then runs xrai.cli.commands.main(TRAIN ARGS) for each `--` group in turn and
exits with the first non-zero status, else 0):
  --write-log DIR          write DIR/rank<R>.json after each run (and at exit): the files this rank created,
                      replaced or removed under any --out (Python's audit hooks see every open for writing,
                      rename, mkdir and unlink), and the manifest paths each run's training epochs served, batch
                      by batch ({run name: {epoch: [[path, ...], ...]}}; a run's name is its --out's name)
  --no-augment NAMES  in the runs so named (comma-separated), GpuAugment's eval branch for training batches too
                      (identical inputs for any sharding)
  --hang RANK:EPOCH:FILE  on that rank, after two batches of that epoch, write the pid to FILE and sleep
  --fail RANK:EPOCH:NAME  in the run whose --out is named NAME, on that rank, raise RuntimeError after two
                      batches of that epoch
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-log", default=None)
    parser.add_argument("--no-augment", default="")
    parser.add_argument("--hang", default=None)
    parser.add_argument("--fail", default=None)
    hooks, rest = parser.parse_known_args()
    runs: list[list[str]] = []
    for arg in rest:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    torch.set_num_threads(1)  # the same thread count in every process keeps CPU kernels bit-identical
    rank = int(os.environ.get("RANK", "0"))

    import xrai.data.dataset as dataset
    import xrai.data.loader as loader
    from xrai.cli.commands import main as xrai_main
    from xrai.data.augment import GpuAugment
    from xrai.train import distributed

    outs = [str(Path(run[run.index("--out") + 1]).resolve()) for run in runs]
    writes: list[list[str]] = []
    served: dict[str, dict[int, list[list[str]]]] = {}

    if hooks.write_log:
        def audit(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], (str, os.PathLike)):
                mode, flags = args[1] or "", args[2] or 0
                if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    paths = [args[0]]
                else:
                    return
            elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
                paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
            else:
                return
            for path in paths:
                if str(Path(os.fsdecode(path)).resolve()).startswith(tuple(outs)):
                    writes.append([event, os.fsdecode(path)])

        sys.addaudithook(audit)

        def dump() -> None:  # atomically: torchrun may end this rank while it writes (it then keeps the last)
            path = Path(hooks.write_log, f"rank{rank}.json")
            path.with_suffix(".tmp").write_text(json.dumps({"writes": writes, "served": served}))
            os.replace(path.with_suffix(".tmp"), path)

        atexit.register(dump)  # a rank that torchrun terminates skips it: dumped after each run as well
    else:
        def dump() -> None:
            pass

    current: list[str] = [""]  # the name of the --out of the run under way
    plain = set(filter(None, hooks.no_augment.split(",")))
    original_init = GpuAugment.__init__

    def maybe_eval_only(self, image_size, *, train, **kwargs):
        original_init(self, image_size, train=train and current[0] not in plain, **kwargs)

    GpuAugment.__init__ = maybe_eval_only
    for cls in (loader.CachedBatches, dataset.ClassicBatches):
        cls.epoch = _hooked(cls.epoch, rank, served, hooks.hang, hooks.fail, current)
    # One process group for all the runs: cmd_train ends it after a run, and a group initialised again at
    # once can meet the other rank's old one in torchrun's store.
    teardown, distributed.teardown = distributed.teardown, lambda: None
    for run in runs:
        current[0] = Path(run[run.index("--out") + 1]).name
        code = xrai_main(run)
        dump()
        if code:
            return code
    teardown()
    return 0


def _hooked(epoch_of, rank: int, served: dict, hang: str | None, fail: str | None, current: list[str]):
    def epoch(self, k):
        positions = self.batch_positions(k)
        for i, batch in enumerate(epoch_of(self, k)):
            if self.train:
                served.setdefault(current[0], {}).setdefault(k, []).append([str(p) for p in self.manifest["path"].iloc[positions[i]]])
                if hang and i == 2 and (int(hang.split(":")[0]), int(hang.split(":")[1])) == (rank, k):
                    Path(hang.split(":", 2)[2]).write_text(str(os.getpid()))
                    time.sleep(600)
                if fail and i == 2 and fail.split(":") == [str(rank), str(k), current[0]]:
                    raise RuntimeError(f"injected failure on rank {rank} in epoch {k}")
            yield batch

    return epoch


if __name__ == "__main__":
    sys.exit(main())
