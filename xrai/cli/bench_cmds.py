"""``python -m xrai bench``: the input paths and the model side by side, a recipe's CV AUROC, or the README's
table from a saved bench JSON (``--markdown``, which needs no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from xrai.bench.report import markdown_table

__all__ = ["cmd_bench"]


def cmd_bench(args) -> int:
    if args.recipe is not None:
        from xrai.bench.recipe import bench_recipe  # deliberate: torch only for a measuring run (as below)

        bench_recipe(args.recipe, data=args.data, root=args.root, quick=args.quick, out=args.out,
                     json_path=args.json)
        return 0
    if args.markdown:
        path = Path(args.markdown)
        if not path.is_file():
            raise FileNotFoundError(f"no bench JSON at {path}; write one with python -m xrai bench --json {path}")
        print(markdown_table(json.loads(path.read_text())))
        return 0
    # Deliberate: torch only for a measuring run; `bench --markdown` formats a saved JSON without it.
    from xrai.bench.run import run_bench
    from xrai.train.launcher import resolve_nproc

    nproc = None
    if args.nproc is not None:
        nproc = resolve_nproc(args.nproc, args.device)
        if nproc < 2:
            raise ValueError(f"--nproc {args.nproc} gives {nproc} process on this machine; the scaling bench compares "
                             "1 with N >= 2 (one per GPU), or pass --nproc 2 --device cpu to try it on CPU processes")
    run_bench(data=args.data, root=args.root, model=args.model, img_size=args.img_size, device=args.device,
              json_path=args.json, nproc=nproc)
    return 0
