# Build: docker build -t tollgate .
# Run:   docker run -p 9002:9002 -p 9003:9003 -v $PWD/policies:/etc/tollgate:ro tollgate
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# jemalloc (the global allocator) is built from C with make.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
# The pinned toolchain (rustup in the image installs it).
COPY rust-toolchain.toml ./
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY policies policies
COPY benches benches
RUN cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 tollgate \
 && mkdir -p /var/lib/tollgate && chown 10001 /var/lib/tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY policies /etc/tollgate
USER 10001
EXPOSE 9002 9003
# The embedded store lives here; mount a volume to keep it across container restarts.
VOLUME /var/lib/tollgate
ENV TOLLGATE_LOG_FORMAT=json TOLLGATE_DATA_DIR=/var/lib/tollgate
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate"]
