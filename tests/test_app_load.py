"""Bounded load test against the real server on 127.0.0.1: good and bad uploads mixed, 8 threads.

The server runs in a subprocess (`xrai.app.serve`) so its memory can be measured on its own. Run with
`-s` to see the figures (requests/s, latency percentiles, server RSS before and after).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_app import MB, bad_uploads, build_fake_run, xray_bytes

pytestmark = pytest.mark.slow

N_REQUESTS = 200
N_THREADS = 8
WALL_LIMIT_S = 300
RSS_SLACK_MB = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    requests = pytest.importorskip("requests")
    psutil = pytest.importorskip("psutil")
    run = build_fake_run(tmp_path)
    port = _free_port()
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING); from xrai.app import serve; "
            "serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {(tmp_path / 'server.log').read_text()}")
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /healthz within 120 s")
            time.sleep(0.25)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _plan(seed: int = 0) -> list[tuple[str, str, bytes, str]]:
    """(kind, url, payload, field) for N_REQUESTS requests: ~half good, the rest each kind of bad."""
    bad = bad_uploads()
    good = [xray_bytes(seed=s, height=96 + 8 * s, width=80 + 4 * s) for s in range(6)]
    jpeg = [xray_bytes("JPEG", seed=s, height=200, width=160) for s in range(2)]
    mix = (
        [("good", "/api/predict", good[i % 6], "file") for i in range(50)]
        + [("good", "/api/predict?overlay=1", good[i % 6], "file") for i in range(30)]
        + [("good", "/", jpeg[i % 2], "file") for i in range(20)]
        + [("bad", "/api/predict", b"<html>not an image</html>" * 40, "file") for _ in range(25)]
        + [("bad", "/api/predict", bad["truncated_png"], "file") for _ in range(15)]
        + [("bad", "/", bad["truncated_jpeg_header_only"], "file") for _ in range(10)]
        + [("bad", "/api/predict", bad["bomb"], "file") for _ in range(10)]
        + [("oversize", "/api/predict", b"\x00" * (10 * MB + 1024), "file") for _ in range(10)]
        + [("oversize", "/", b"\x00" * (11 * MB), "file") for _ in range(5)]
        + [("bad", "/api/predict", good[0], "image") for _ in range(10)]  # wrong field name
        + [("bad", "/api/predict", b"", "file") for _ in range(15)]
    )
    assert len(mix) == N_REQUESTS
    random.Random(seed).shuffle(mix)
    return mix


def _send(url: str, item: tuple[str, str, bytes, str]) -> tuple[str, int, float]:
    import requests

    kind, path, payload, field = item
    start = time.perf_counter()
    try:
        response = requests.post(url + path, files={field: ("upload.png", payload, "image/png")}, timeout=120)
        status = response.status_code
    except requests.ConnectionError:
        status = -1  # recorded, and failed below: even an oversize body must get its 413

    return kind, status, time.perf_counter() - start


def test_mixed_load_keeps_the_server_healthy(server):
    import requests

    url, process = server
    rss_start = process.memory_info().rss / MB
    # Warm-up, concurrent like the load itself: the first CAM, allocator pools, the threads' arenas.
    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        warm = list(pool.map(lambda item: _send(url, item), _plan(seed=1)[:48]))
    assert all(status < 500 for _, status, _ in warm)
    rss_before = process.memory_info().rss / MB

    plan = _plan()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        results = list(pool.map(lambda item: _send(url, item), plan))
    wall = time.perf_counter() - start
    rss_after = process.memory_info().rss / MB

    statuses = [status for _, status, _ in results]
    latencies = sorted(seconds for _, _, seconds in results)
    good_latencies = sorted(seconds for kind, status, seconds in results if kind == "good")
    p50, p90 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.9)]
    g50, g90 = good_latencies[len(good_latencies) // 2], good_latencies[int(len(good_latencies) * 0.9)]
    by_status: dict[int, int] = {}
    for status in statuses:
        by_status[status] = by_status.get(status, 0) + 1
    print(f"\nload: {len(results)} requests from {N_THREADS} threads in {wall:.1f} s = "
          f"{len(results) / wall:.1f} req/s; statuses {dict(sorted(by_status.items()))}")
    print(f"latency all  p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms; "
          f"good (200s) p50 {g50 * 1000:.0f} ms, p90 {g90 * 1000:.0f} ms")
    print(f"server RSS at start {rss_start:.0f} MB, after warm-up {rss_before:.0f} MB, after load {rss_after:.0f} MB "
          f"({rss_after - rss_before:+.0f} MB)")

    assert wall < WALL_LIMIT_S
    assert not [s for s in statuses if s >= 500], by_status
    for kind, status, _ in results:
        if kind == "good":
            assert status == 200, (kind, status)
        elif kind == "oversize":
            assert status == 413, (kind, status)
        else:
            assert 400 <= status < 500, (kind, status)
    assert process.is_running()
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    assert rss_after - rss_before < RSS_SLACK_MB
