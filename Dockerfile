# X-RAI on CPU: serves one trained run folder, mounted as a volume. Two targets:
#
#   PyTorch, with Grad-CAM (the default, the last stage):
#     docker build -t xrai .
#     docker run --rm -p 5000:5000 -v "$PWD/runs/demo:/run:ro" xrai serve --run /run --host 0.0.0.0
#
#   ONNX, without torch (onnxruntime, Pillow, pydicom, numpy, Flask, waitress; no Grad-CAM): first
#   `python -m xrai export --run runs/demo --format onnx`, then
#     docker build --target onnx -t xrai-onnx .
#     docker run --rm -p 5000:5000 -v "$PWD/runs/demo:/run:ro" xrai-onnx
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XRAI_HOME=/tmp/xrai \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/xrai
RUN useradd --create-home --uid 10001 xrai
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4).status != 200)"]
# `serve` runs the app under waitress (the production server: a bounded thread pool, connection
# timeouts, no Server header); Flask's development server only ever runs with `serve --debug`.
ENTRYPOINT ["python", "-m", "xrai"]


# ---- ONNX serving without torch: xrai itself with --no-deps, then exactly what `serve --onnx` imports.
# Its installed size, measured as a fresh venv holding exactly these packages, is in docs/performance.md.
FROM base AS onnx
RUN pip install "onnxruntime>=1.14" "pillow>=9.4" "pydicom>=3.0" "numpy>=1.24" "flask>=2.3" "waitress>=3.0.1"
COPY pyproject.toml requirements.txt README.md ./
COPY xrai ./xrai
RUN pip install --no-deps .
USER xrai
CMD ["serve", "--onnx", "/run/model.onnx", "--host", "0.0.0.0", "--port", "5000"]


# ---- PyTorch serving with Grad-CAM (the default target).
FROM base AS torch
# CPU wheels first, from PyTorch's CPU index: the package's torch requirement is then already met,
# so pip never pulls the CUDA build (gigabytes) from PyPI. This layer survives code changes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision
COPY pyproject.toml requirements.txt README.md ./
COPY xrai ./xrai
RUN pip install .
USER xrai
CMD ["serve", "--run", "/run", "--host", "0.0.0.0", "--port", "5000"]
