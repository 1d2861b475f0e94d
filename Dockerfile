# One image for every flowscope component:
#   flowscope operator | agent | aggregator | collector | render
# The operator hands this same image to the agents and aggregators it deploys.
#
#   podman build -t flowscope:0.1.0 .
#   podman build --build-arg EXTRAS=agent,operator,collector -t flowscope:0.1.0-chdb .   # + embedded ClickHouse (~500 MB)
#
# BASE must be Debian bookworm (any variant): Python comes from its apt repository, so
# the build stage and the runtime stage share one interpreter path.
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
ARG EXTRAS=agent,operator
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flowscope/ flowscope/
COPY ipfix/ ipfix/
COPY agent/ agent/
COPY aggregator/ aggregator/
COPY collector/ collector/
COPY operator/ operator/
RUN python3 -m venv /opt/flowscope \
 && /opt/flowscope/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/flowscope/bin/pip install --no-cache-dir "/src[${EXTRAS}]" "clickhouse-driver>=0.2" \
 && /opt/flowscope/bin/flowscope --version

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
COPY --from=build /opt/flowscope /opt/flowscope
COPY crds/ /opt/flowscope/share/crds/
ENV PATH=/opt/flowscope/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Unprivileged by default (operator, aggregator, collector); the agent's DaemonSet runs
# it as root with NET_ADMIN, which reading the conntrack table requires.
USER 65532:65532
ENTRYPOINT ["flowscope"]
CMD ["--help"]
