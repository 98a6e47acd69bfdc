# The modelfleet images from one file. `make images` builds the operator and runtime targets with buildah
# and no registry (a Debian base built locally, wheels downloaded beforehand); Docker/BuildKit builds it
# unchanged:
#   docker build --target operator    -t modelfleet-operator:0.1.0 .
#   docker build --target runtime     -t modelfleet-runtime:0.1.0 .
#   docker build --target runtime-gpu -t modelfleet-runtime-gpu:0.1.0 .
# Python packages are exactly uv.lock's, as requirements/<image>.txt with hashes (`make lock` exports them).
# WHEELS, when set, names a folder of those wheels mounted into the build: nothing is then fetched. Each stage
# that installs declares it again: BuildKit hands a stage's ARGs to the stages built on it, buildah does not.
# runtime-gpu starts from NVIDIA's TensorRT image (CUDA 13 and cuDNN 9 in the system paths) and is not built on the
# project's machines (no GPU, no registry); its requirement set is the `gpu` extra's: onnxruntime-gpu, never
# onnxruntime too (issue 17). Each runtime stage runs the runtime's self-check, so an image holding two ONNX
# Runtime distributions fails to build instead of serving on CPU.
# Nothing writes at run time, so the root filesystem can be read-only: the wheels' .py files are compiled at
# install, and ORT_DISABLE_TELEMETRY keeps ONNX Runtime from writing a device ID under $HOME at import.
ARG BASE_IMAGE=python:3.11-slim
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
ARG WHEELS=

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1
# The non-root user the pods run as needs a name: getpass.getuser() (kopf's identity, among others)
# raises for a uid without a passwd entry.
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'nonroot:x:65532:' >> /etc/group
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY operator ./operator
COPY runtime ./runtime

FROM base AS operator
ARG WHEELS
RUN pip install --quiet ${WHEELS:+--no-index --find-links "$WHEELS"} --require-hashes --no-deps \
        -r requirements/operator.txt \
 && pip install --quiet --no-index --no-deps --no-build-isolation . && rm -rf /src
USER 65532:65532
ENTRYPOINT ["modelfleet"]
CMD ["operator"]

FROM base AS runtime
ARG WHEELS
RUN pip install --quiet ${WHEELS:+--no-index --find-links "$WHEELS"} --require-hashes --no-deps \
        -r requirements/runtime.txt \
 && pip install --quiet --no-index --no-deps --no-build-isolation . && rm -rf /src \
 && python -m modelfleet_runtime.selfcheck
USER 65532:65532
ENTRYPOINT ["modelfleet"]
CMD ["serve", "--help"]

FROM ${GPU_BASE_IMAGE} AS runtime-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'nonroot:x:65532:' >> /etc/group
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY operator ./operator
COPY runtime ./runtime
RUN pip install --quiet --require-hashes --no-deps -r requirements/runtime-gpu.txt \
 && pip install --quiet --no-index --no-deps --no-build-isolation . && rm -rf /src \
 && python -m modelfleet_runtime.selfcheck
USER 65532:65532
ENTRYPOINT ["modelfleet"]
CMD ["serve", "--help"]
