"""The bench in CI size: a tiny synthetic set, a few batches, small images. Keys and positive numbers
only: this machine is shared, so no speed is asserted. The README's performance table is the saved
bench JSON's, and the cached path's memory stays bounded over a cache much larger than a batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xrai.bench.run import (
    format_table,
    machine_info,
    markdown_table,
    memory_check,
    run_bench,
)
from xrai.cli.commands import main

REPO = Path(__file__).resolve().parents[1]
README_BENCH = REPO / "docs" / "bench" / "cpu-2core.json"  # the run the README's table shows
DESIGN_KEYS = {"machine", "model", "img_size", "device", "data", "ready_img_s", "feed_img_s", "train_img_s",
               "cache_build_img_s", "predict_gradcam_ms"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_smoke(synthetic_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # onnx=False: the onnxruntime latency (an ONNX export, tens of seconds) is timed on test_export.py's export.
    result = run_bench(data="synthetic", root=synthetic_root, img_size=48, device="cpu", batch_size=8, n_batches=2,
                       json_path=out, progress=False, latency_runs=2, feed_batches=3, onnx=False)
    assert set(result) == DESIGN_KEYS | {"batch_size", "images", "load_average", "predict_ms"}
    assert result["predict_ms"]["torch_cpu"]["median"] > 0 and result["predict_ms"]["onnxruntime_cpu"] is None
    assert set(result["machine"]) == {"cpu", "cores", "gpu"} and result["machine"]["cores"] >= 1
    assert result["model"] == "mobilenet_v2" and result["img_size"] == 48 and result["device"] == "cpu"
    assert result["data"].startswith("synthetic:") and result["batch_size"] == 8 and result["images"] > 8
    assert set(result["ready_img_s"]) == {"cached", "classic", "seeds"}
    assert set(result["feed_img_s"]) == {"cached", "classic"}
    assert set(result["train_img_s"]) == {"cached", "classic", "ceiling"}
    assert set(result["predict_gradcam_ms"]) == {"median", "p90"}
    numbers = [*result["ready_img_s"].values(), *result["feed_img_s"].values(), *result["train_img_s"].values(),
               result["cache_build_img_s"], *result["predict_gradcam_ms"].values()]
    assert all(isinstance(v, float) and v > 0 for v in numbers)
    assert json.loads(out.read_text()) == result
    printed = capsys.readouterr().out
    assert "ready batches on cpu" in printed and "predict, one image, CPU: PyTorch median" in printed


def _fake() -> dict:
    return {"machine": machine_info(), "model": "m", "img_size": 224, "device": "cpu", "data": "x:/y",
            "batch_size": 64, "images": 100, "load_average": {"start": 3.0, "end": 2.5}, "ready_img_s": {"cached": 1500.0, "classic": 1000.0, "seeds": 600.0},
            "feed_img_s": {"cached": 30000.0, "classic": 1200.0},
            "train_img_s": {"cached": 9.0, "classic": 8.0, "ceiling": 10.0},
            "cache_build_img_s": 150.0, "predict_gradcam_ms": {"median": 80.0, "p90": 90.0}}


def test_tables_compute_their_ratios_from_the_figures():
    table = markdown_table(_fake())
    assert "cached 1.5x classic, 2.5x the seeds'" in table and "cached = 90% of it" in table
    assert "cached gather 30,000 img/s" in table and table.count("| ") >= 5
    assert "load average 3.0 at the start, 2.5 at the end" in table
    assert "1,500" in format_table(_fake()) and "ready batches on cpu" in format_table(_fake())


def test_readme_table_is_the_saved_bench_json(tmp_path, capsys):
    """The README's performance rows are `bench --markdown` of one saved run, so the two cannot disagree."""
    saved = json.loads(README_BENCH.read_text())
    assert set(saved) >= DESIGN_KEYS and saved["data"].startswith("fracatlas:")
    block = re.search(r"<!-- bench:begin[^>]*-->\n(.*?)\n<!-- bench:end -->", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md lost its <!-- bench:begin --> ... <!-- bench:end --> block"
    assert block.group(1) == markdown_table(saved)
    assert main(["bench", "--markdown", str(README_BENCH)]) == 0
    assert capsys.readouterr().out.strip() == markdown_table(saved)
    assert main(["bench", "--markdown", str(tmp_path / "missing.json")]) == 2  # one line, no traceback


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_memory_stays_bounded_over_a_cache_much_larger_than_a_batch(tmp_path):
    batch_mb = 64 * 64 * 64 / 2**20  # one uint8 batch: 0.25 MiB (augmented to 32 px float32: 0.75 MiB)
    result = memory_check(gb=0.096, size=64, image_size=32, batch_size=64, cache_dir=tmp_path, progress=False)
    cache_mb = result["cache_gb"] * 1e9 / 2**20
    assert result["batches"] == result["images"] // 64 > 300 and cache_mb > 300 * batch_mb
    # Reading the cache into the heap (a copy instead of the memmap's file-backed pages) would add ~90 MiB;
    # the gather thread's ring, the augmented batch and allocator slack stay far below that.
    assert 0 <= result["rss_anon_mb_growth"] < 24, result
    assert result["rss_anon_mb_growth"] < cache_mb / 4
