# MedPLIB Portal for a course's own GPU server (see README, "Self-host for a course").
#   GPU image (default):  docker build -t medplib-portal .
#   CPU image:            docker build --build-arg BASE_IMAGE=python:3.11-slim -t medplib-portal:cpu .
#   docker run --gpus all -p 7860:7860 -v medplib-hf:/cache/huggingface -v medplib-var:/app/var \
#       -e MEDPLIB_MODEL=Huangxs/MedPLIB-7b-2e medplib-portal
# The CUDA base provides the driver libraries only; Python 3.11 and the pinned packages come from
# requirements.txt (torch's CUDA wheel on the GPU image: pass TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu128).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=""
# WITH_RAY=1 adds Ray Serve (requirements-serve.txt) for `--engine ray` / `python -m engine.serve`
ARG WITH_RAY=0
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860

RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update -qq && apt-get install -y -qq --no-install-recommends software-properties-common \
        && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update -qq \
        && apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-serve.txt ./
# psycopg: DATABASE_URL may point at PostgreSQL (same pin as requirements-dev.txt)
RUN pip install -q ${TORCH_INDEX:+--extra-index-url $TORCH_INDEX} -r requirements.txt "psycopg[binary]==3.3.9" \
    && if [ "$WITH_RAY" = "1" ]; then pip install -q -r requirements-serve.txt; fi

COPY . /app
RUN useradd --create-home --uid 1000 portal && mkdir -p /app/var /cache/huggingface \
    && chown -R portal /app/var /cache
USER portal

# Weights are cached in $HF_HOME (mount a volume there); the SQLite case library lives in /app/var (a volume
# on local disk) unless DATABASE_URL points at PostgreSQL.
VOLUME ["/cache/huggingface", "/app/var"]
EXPOSE 7860
CMD ["python", "app.py"]
