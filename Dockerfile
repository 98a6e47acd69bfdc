# Two images from one file. Not built or run in CI: the machines here have no container engine.
#   docker build --target operator -t ghcr.io/modelfleet/modelfleet-operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/modelfleet/modelfleet-runtime:0.1.0 .
# The runtime target is CPU-only (ONNX Runtime). A GPU runtime image starts from an NVIDIA TensorRT
# base (e.g. nvcr.io/nvidia/tensorrt:<version>-py3) and installs '.[runtime,gpu]' instead.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY runtime ./runtime

FROM base AS operator
RUN pip install '.[operator]' && rm -rf /src
USER 65532:65532
ENTRYPOINT ["modelfleet"]
CMD ["operator"]

FROM base AS runtime
RUN pip install '.[runtime]' && rm -rf /src
USER 65532:65532
ENTRYPOINT ["modelfleet"]
CMD ["serve", "--help"]
