# byokd: build with the Rust toolchain, run on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin byokd

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 byokd
COPY --from=build /src/target/release/byokd /usr/local/bin/byokd
COPY schedules /etc/byokd/schedules
USER byokd
ENV BYOKD_HTTP_ADDR=0.0.0.0:8080 BYOKD_SCHEDULES_DIR=/etc/byokd/schedules
EXPOSE 8080
ENTRYPOINT ["byokd"]
CMD ["run"]
