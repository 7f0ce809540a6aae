# syntax=docker/dockerfile:1
# One image for every workload of the pipeline: processor, sqs-consumer,
# loadgen and streamctl in /usr/local/bin; each Kubernetes workload picks its
# binary with `command` (k8s/base/platform/*.yaml). Built by `make images` as
# the Makefile's IMAGE (stream-pipeline:dev) and imported into k3d.

FROM rust:1-bookworm AS builder
# rdkafka builds librdkafka with make and gcc; libz-sys links the system zlib;
# aws-lc-sys (rustls' crypto for the AWS SDK) may want cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config cmake zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p stream-bins -p loadgen \
 && mkdir -p /out \
 && cp target/release/processor target/release/sqs-consumer target/release/loadgen target/release/streamctl /out/

# fonts-dejavu-core: the font `streamctl chart` labels its PNG with.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 stream \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin stream
COPY --from=builder /out/processor /out/sqs-consumer /out/loadgen /out/streamctl /usr/local/bin/
# Numeric, so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 10001:10001
# processor /metrics, loadgen /metrics, sqs-consumer /metrics (METRICS_ADDR),
# streamctl lag --serve (LAG_EXPORTER_ADDR).
EXPOSE 9464 9465 9466 9467
CMD ["processor"]
