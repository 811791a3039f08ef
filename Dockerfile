# syntax=docker/dockerfile:1
# The `sluice` binary in a small runtime image. Every Sluice process (ingest, stages,
# sinks, replay, audit) is this image with a different subcommand; the Helm chart in
# helm/sluice runs it. Build: docker build -t ghcr.io/sluice/sluice:0.1.0 .

FROM rust:1.85-bookworm AS build
# librdkafka is built from source by the rdkafka crate: it needs a C toolchain and make,
# and OpenSSL's headers for TLS and SASL/SCRAM towards the brokers.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      build-essential python3 pkg-config libssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY core/Cargo.toml core/Cargo.toml
COPY schemas/Cargo.toml schemas/Cargo.toml
COPY ingest/Cargo.toml ingest/Cargo.toml
COPY stages/Cargo.toml stages/Cargo.toml
COPY sinks/Cargo.toml sinks/Cargo.toml
COPY cli/Cargo.toml cli/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
RUN cargo fetch --locked
COPY . .
RUN cargo build --release --locked -p sluice --bin sluice

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
# The IP → network/country table the enrich stage loads (config enrich.geo_csv).
COPY data/ip-networks.csv /usr/share/sluice/ip-networks.csv
USER 10001
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["--help"]
