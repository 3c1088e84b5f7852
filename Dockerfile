# The agent image: Debian (bookworm) Python 3.11 with the mount tools. FUSE needs no library:
# the agent speaks the protocol on /dev/fuse itself.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY scripts ./scripts
COPY cacheagent ./cacheagent
RUN pip install --no-cache-dir grpcio-tools mypy-protobuf \
 && python scripts/gen_protos.py --force \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENTRYPOINT ["cacheagent"]
CMD ["--config", "/etc/cacheagent/config.yaml", "serve"]
