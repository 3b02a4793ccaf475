# Inspection service image: the `serve` extra only (ONNX Runtime, no torch), non-root.
# Models, records and the image archive live in the /data volume (CELLINSPECT_HOME).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY datasets ./datasets
COPY models ./models
COPY training ./training
COPY serving ./serving
RUN pip install '.[serve]' && rm -rf /app/*

RUN useradd --create-home --uid 10001 cellinspect \
    && mkdir -p /data && chown cellinspect:cellinspect /data
USER cellinspect
WORKDIR /home/cellinspect

# Production mode refuses to start without real API keys: pass CELLINSPECT_API_KEYS
# (or mount a keys file and set CELLINSPECT_API_KEYS_FILE).
ENV CELLINSPECT_HOME=/data \
    CELLINSPECT_MODE=production
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u, sys; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

CMD ["cellinspect", "serve", "--host", "0.0.0.0", "--port", "8000"]
