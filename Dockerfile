# syntax=docker/dockerfile:1
# tollgate's runtime image: the release binary on distroless `cc` (glibc and libgcc_s, which
# the binary links, plus CA certificates for rediss:// and callouts; no shell, no package
# manager), running as the image's non-root user.
#   docker build -t tollgate .
#   docker run --read-only -p 9002:9002 -p 9003:9003 tollgate
# serves the example configuration of policies/ (the management API stays off without
# --admin-token-file or --admin-token-env).
# The root file system can be read-only: tollgate writes only the embedded store, under
# /var/lib/tollgate (a volume; Kubernetes mounts an emptyDir or nothing with --store redis).
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (deploy/base/deployment.yaml).
# .dockerignore admits only what the build reads. tests/deploy.rs builds this stage's cargo
# command from that context and lints this file.

# Debian 12, as the runtime image below: the binary's glibc symbols are there.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# jemalloc (the global allocator) is built from C with make. The context's rust-toolchain.toml
# pins the toolchain: rustup in this image installs it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY . .
# The binary is stripped (37 MB instead of 165 MB with the release profile's line tables).
# `tollgate version` and `tollgate_build_info` name the commit:
#   docker build --build-arg TOLLGATE_GIT_COMMIT=$(git rev-parse --short HEAD) .
ARG TOLLGATE_GIT_COMMIT=unknown
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --config profile.release.strip=true --bin tollgate \
 && install -D -m 0755 target/release/tollgate /out/tollgate \
 && install -d -m 0700 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY --from=build --chown=65532:65532 /out/data /var/lib/tollgate
COPY policies /etc/tollgate
USER 65532:65532
EXPOSE 9002 9003
VOLUME ["/var/lib/tollgate"]
ENV TOLLGATE_LOG_FORMAT=json TOLLGATE_DATA_DIR=/var/lib/tollgate
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate"]
