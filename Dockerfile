# syntax=docker/dockerfile:1

# Bookworm, to match the glibc of the Debian 12 runtime image below.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and build artifacts between builds; the
# binary is copied out in the same step because the target mount is not part
# of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p fleet-handshake \
    && cp target/release/fleet-handshake /fleet-handshake

# No shell or package manager: the operator needs only glibc and libgcc, which
# the `cc` variant provides. TLS is rustls, so no OpenSSL either.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /fleet-handshake /fleet-handshake
# Numeric, so Kubernetes can verify `runAsNonRoot` without reading /etc/passwd.
USER 65532:65532
# Metrics and health (`--metrics-addr`, default 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["/fleet-handshake"]
CMD ["run"]
