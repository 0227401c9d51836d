# One image for every service process: `opsd migrate`, `opsd api`, `opsd worker` (see
# docker-compose.yml). torch comes first, from the index named by the build args: the CPU build by
# default; for a GPU worker build with e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                --build-arg TORCH_SPEC=torch==2.13.0 -t opsd .
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPSD_HOME=/var/lib/opsd \
    HF_HOME=/var/lib/opsd/hf \
    TOKENIZERS_PARALLELISM=false

RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "${TORCH_SPEC}"

# The service's own dependencies (API, store, broker), in their own layer so code edits do not
# reinstall them.
RUN pip install \
        "celery[redis]>=5.4" \
        "fastapi>=0.110" \
        "uvicorn[standard]>=0.29" \
        "pydantic-settings>=2.2" \
        "sqlalchemy>=2.0" \
        "psycopg[binary]>=3.1" \
        "alembic>=1.13" \
        "httpx>=0.27"

WORKDIR /app
COPY . /app
# Editable, so the Alembic migrations beside the packages are found at /app/migrations.
RUN pip install -e ".[service,s3]" \
    && useradd --create-home --uid 1000 opsd \
    && mkdir -p /artifacts /var/lib/opsd/hf \
    && chown -R opsd:opsd /artifacts /var/lib/opsd

USER opsd
EXPOSE 8000
CMD ["opsd", "api", "--host", "0.0.0.0"]
