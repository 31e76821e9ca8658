"""The bench in CI size: a tiny synthetic set, a few batches, small images. Keys and positive numbers
only: this machine is shared, so no speed is asserted."""

from __future__ import annotations

import json

from xrai.bench import format_table, machine_info, memory_check, run_bench


def test_bench_smoke(synthetic_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # onnx=False: the ONNX latency (an export, tens of seconds) is tested on test_export.py's export.
    result = run_bench(data="synthetic", root=synthetic_root, img_size=48, device="cpu", batch_size=8, n_batches=2,
                       json_path=out, progress=False, latency_runs=2, onnx=False)
    assert set(result) == {"machine", "model", "img_size", "device", "data", "feed_img_s", "train_img_s",
                           "cache_build_img_s", "predict_gradcam_ms", "predict_ms"}
    assert set(result["machine"]) == {"cpu", "cores", "gpu"} and result["machine"]["cores"] >= 1
    assert result["model"] == "mobilenet_v2" and result["img_size"] == 48 and result["device"] == "cpu"
    assert result["data"].startswith("synthetic:")
    assert set(result["feed_img_s"]) == {"cached", "classic"}
    assert set(result["train_img_s"]) == {"cached", "classic", "ceiling"}
    assert set(result["predict_gradcam_ms"]) == {"median", "p90"}
    numbers = [*result["feed_img_s"].values(), *result["train_img_s"].values(), result["cache_build_img_s"],
               *result["predict_gradcam_ms"].values()]
    assert all(isinstance(v, float) and v > 0 for v in numbers)
    cpu = result["predict_ms"]
    assert set(cpu) == {"torch_cpu", "onnxruntime_cpu"} and cpu["torch_cpu"]["median"] > 0
    assert cpu["onnxruntime_cpu"] is None
    assert json.loads(out.read_text()) == result
    printed = capsys.readouterr().out
    assert "host feed" in printed and "predict, one image, CPU: PyTorch median" in printed
    assert "onnxruntime not timed" in printed


def test_table_and_machine():
    info = machine_info()
    assert info["cpu"] and info["cores"] >= 1
    fake = {"machine": info, "model": "m", "img_size": 224, "device": "cpu", "data": "x:/y",
            "feed_img_s": {"cached": 3000.0, "classic": 100.0},
            "train_img_s": {"cached": 9.0, "classic": 8.0, "ceiling": 10.0},
            "cache_build_img_s": 150.0, "predict_gradcam_ms": {"median": 80.0, "p90": 90.0}}
    assert "30.0x" in format_table(fake)


def test_memory_check_runs_small(tmp_path):
    result = memory_check(gb=0.002, size=32, image_size=28, batch_size=16, cache_dir=tmp_path, progress=False)
    assert result["images"] == 0.002e9 // (32 * 32) and result["batches"] > 1
    assert result["rss_anon_mb_peak"] >= result["rss_anon_mb_start"] > 0
