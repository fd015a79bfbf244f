# zse serve in a container: built on the CUDA development image, run on the CUDA runtime
# image (which has the cuBLAS zse links) as a non-root user.
#   docker build -t zse .
#   docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro -v zse-state:/var/lib/zse zse
# ZSE_MODEL (default /models/model.zse), ZSE_HOST, ZSE_PORT select what is served; arguments
# after the image name are more `zse serve` options (--auth, --gpu-memory 20G, ...).
# Package names are Ubuntu 24.04's; another base needs its own (tools/install-deps.sh lists
# the Debian ones).
ARG CUDA_VERSION=13.0.0
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake pkg-config libmicrohttpd-dev \
      libjansson-dev libpcre2-dev libutf8proc-dev libsqlite3-dev libssl-dev libxxhash-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# the default GPU code: sm_75/80/86/89/90 and compute_90 PTX (docs/CUDA.md)
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DCMAKE_INSTALL_PREFIX=/opt/zse \
 && cmake --build /build -j"$(nproc)" \
 && cmake --install /build

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmicrohttpd12t64 libjansson4 libpcre2-8-0 libutf8proc3 \
      libsqlite3-0 libssl3t64 libxxhash0 curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 zse \
 && useradd --system --uid 10001 --gid zse --home-dir /var/lib/zse --create-home --shell /usr/sbin/nologin zse
COPY --from=build /opt/zse/bin/zse /usr/local/bin/zse
COPY --from=build /opt/zse/share/man/man1/zse.1 /usr/local/share/man/man1/zse.1
USER 10001:10001
WORKDIR /var/lib/zse
ENV ZSE_MODEL=/models/model.zse ZSE_HOST=0.0.0.0 ZSE_PORT=8000 ZSE_DB=/var/lib/zse/zse.db
VOLUME ["/var/lib/zse"]
EXPOSE 8000
# /health answers 503 while the model loads: the start period gives a large model time
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${ZSE_PORT}/health\" || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c", "exec zse serve \"$ZSE_MODEL\" --host \"$ZSE_HOST\" --port \"$ZSE_PORT\" \"$@\"", "zse"]
