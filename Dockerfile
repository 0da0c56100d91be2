# meshgate: one image for the control plane, the proxies and the init
# container (`meshgate iptables`). Small and non-root by default: the
# proxies run as 1337 (set by injection), the control plane as any user,
# and only the init container runs as root, with NET_ADMIN and NET_RAW.
#
#   docker build -t meshgate:0.1.0 .
#   kind load docker-image meshgate:0.1.0     # or push to your registry

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meshgate \
 && strip target/release/meshgate

FROM debian:bookworm-slim
# iptables for the init container; CA certificates for TLS origination.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshgate /usr/local/bin/meshgate
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/meshgate"]
