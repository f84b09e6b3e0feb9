# byokd: build with the Rust toolchain, run on a slim Debian as a non-root user.
#
#   docker build --build-arg GIT_SHA=$(git rev-parse --short HEAD) -t byokd .
#
# Migrations, email templates and SQL checks (.sqlx/) are compiled into the binary; the
# image carries the binary, CA certificates and the shipped schedules only.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependency layer: build every dependency against stub sources first, so that editing
# byokd's own code rebuilds byokd alone. The stubs stand in for each target Cargo.toml
# declares (a declared bench must exist for the manifest to load).
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for bench in ingest rewrap expiry revocation notify access; do \
         echo 'fn main() {}' > "benches/$bench.rs"; done \
    && cargo build --release --locked --bin byokd \
    && rm -rf src benches target/release/byokd* target/release/.fingerprint/byokd-* \
              target/release/deps/byokd-* target/release/deps/libbyokd-*
COPY . .
# Shown as byokd_build_info{git_sha} in /metrics.
ARG GIT_SHA=
ENV BYOKD_GIT_SHA=${GIT_SHA}
RUN cargo build --release --locked --bin byokd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 byokd \
    && useradd --system --uid 10001 --gid byokd --home-dir /var/lib/byokd \
               --shell /usr/sbin/nologin byokd \
    && install -d -o byokd -g byokd -m 0750 /var/lib/byokd \
    && install -d -o byokd -g byokd -m 0700 /var/lib/byokd/byokd-data \
               /var/lib/byokd/byokd-data/audit-spool
COPY --from=build /src/target/release/byokd /usr/local/bin/byokd
COPY schedules /etc/byokd/schedules
# The working directory is the one place byokd writes (emails as files when no SMTP server
# is configured); the root file system can be mounted read-only.
WORKDIR /var/lib/byokd
# Numeric, so that an orchestrator's runAsNonRoot can check it.
USER 10001:10001
ENV BYOKD_HTTP_ADDR=0.0.0.0:8080 \
    BYOKD_SCHEDULES_DIR=/etc/byokd/schedules \
    BYOKD_MAIL_DIR=/var/lib/byokd/mail
EXPOSE 8080
# Liveness: the process answers /healthz. The slim image has no curl; bash's /dev/tcp does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["byokd"]
CMD ["run"]
