# X-RAI on CPU: serves one trained run folder, mounted as a volume.
#   docker build -t xrai .
#   docker run --rm -p 5000:5000 -v "$PWD/runs/demo:/run:ro" xrai serve --run /run --host 0.0.0.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XRAI_HOME=/tmp/xrai \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/xrai

# CPU wheels first, from PyTorch's CPU index: the package's torch requirement is then already met,
# so pip never pulls the CUDA build (gigabytes) from PyPI. This layer survives code changes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

COPY pyproject.toml requirements.txt README.md ./
COPY xrai ./xrai
RUN pip install . \
    && useradd --create-home --uid 10001 xrai

USER xrai
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4).status != 200)"]

# `serve` runs the app under waitress (the production server: a bounded thread pool, connection
# timeouts, no Server header); Flask's development server only ever runs with `serve --debug`.
ENTRYPOINT ["python", "-m", "xrai"]
CMD ["serve", "--run", "/run", "--host", "0.0.0.0", "--port", "5000"]
