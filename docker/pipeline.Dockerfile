# syntax=docker/dockerfile:1
# The Beam worker image for `cpt prepare`, and the launcher image for the same job.
#
# Build from the repository root (Docker cannot build on the cpt dev machines; `make lint` only lints this file):
#   docker build -f docker/pipeline.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/cpt-pipeline:0.1.0 .
# As Dataflow's worker image:  cpt prepare ... --runner DataflowRunner --sdk_container_image IMAGE
# As the launcher (same Python, Beam and cpt as the workers, which pickled DoFns need):
#   docker run --rm --entrypoint cpt IMAGE prepare --input 'gs://...' --output gs://... --runner DataflowRunner ...
#
# The base must match the pinned apache-beam (setup.py PINS) and Python; tests/test_packaging.py checks both.
FROM apache/beam_python3.11_sdk:2.77.0

# torch only scores perplexity on the workers, so the CPU wheel (about 200 MB, not the multi-GB CUDA one)
# is enough. It goes in first so the `pipeline` extra's torch range is already met and pip keeps it.
# Another build: --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (GPU workers also need a CUDA-capable worker VM and --dataflow_service_options=worker_accelerator=...).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# DL3013 cannot see through the ARG: its default above is an exact pin (checked against the Makefile's TORCH).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/cpt
COPY setup.py pyproject.toml README.md ./
COPY shared/ shared/
COPY pipelines/ pipelines/
# setup.py maps all three folders to cpt.*, so the trainer's sources come along (it never imports Beam).
COPY trainer/ trainer/
# A regular (not editable) install: the workers import cpt from site-packages, independent of /opt/cpt.
# `remote` adds gcsfs/s3fs (fsspec) and boto3 (Beam's s3:// filesystem); `dask` lets the image join a Dask cluster.
# `pip check` fails the build if the pins disagree with what the Beam base image already carries.
# DL3013 wants `pkg==version`: this installs the checkout itself, whose dependencies setup.py pins exactly.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[pipeline,remote,dask]" \
    && pip check \
    && python -c "import apache_beam, cpt.pipelines, torch; print(apache_beam.__version__, torch.__version__)"

# ENTRYPOINT stays the base image's /opt/apache/beam/boot: Dataflow and the portable runners start workers through it.
