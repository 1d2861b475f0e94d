# One image for every flowscope component:
#   flowscope operator | agent | aggregator | collector | render
# The operator hands this same image to the agents and aggregators it deploys.
#
#   podman build -t flowscope:0.1.0 .
#   podman build --build-arg EXTRAS=agent,operator,collector -t flowscope:0.1.0-chdb .   # + embedded ClickHouse (~500 MB)
#
# BASE must be Debian bookworm (any variant): Python comes from its apt repository, so
# the build stage and the runtime stage share one interpreter path.
#
# Three stages. "ui" vendors the dashboards' chart library exactly as scripts/setup.sh
# does in a checkout (Debian's nodejs and npm, `npm ci` from package-lock.json, the
# bundle and its licence copied into collector/ui/static/vendor/, which git ignores);
# "build" installs flowscope with that file in its package data; the last stage carries
# the virtualenv only (no node, no compiler). tests/operator/test_operator_image.py checks
# these steps against setup.sh's package lists and commands.
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS ui
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund \
 && mkdir -p /vendor \
 && cp node_modules/echarts/dist/echarts.min.js /vendor/echarts.min.js \
 && cp node_modules/echarts/LICENSE /vendor/echarts.LICENSE \
 && test -s /vendor/echarts.min.js

FROM ${BASE} AS build
ARG EXTRAS=agent,operator
# gcc and python3-dev build the optional C accelerators (setup.py), as setup.sh's list has them
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY flowscope/ flowscope/
COPY ipfix/ ipfix/
COPY agent/ agent/
COPY aggregator/ aggregator/
COPY collector/ collector/
COPY operator/ operator/
COPY --from=ui /vendor/ collector/ui/static/vendor/
RUN python3 -m venv /opt/flowscope \
 && /opt/flowscope/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/flowscope/bin/pip install --no-cache-dir "/src[${EXTRAS}]" "clickhouse-driver>=0.2" \
 && /opt/flowscope/bin/flowscope --version \
 && /opt/flowscope/bin/python -c 'from flowscope.collector.ui.options import check_chart_bundle; check_chart_bundle()'

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
