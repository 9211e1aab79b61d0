# A MONAI Application Package (MAP) made by segmap.
#
# Build context: a folder written by `segmap package ... --dry-run DIR` (app/, models/, task/, app.yaml, app.json,
# pkg.json, tools, requirements*.txt, wheelhouse/). Nothing is fetched from the network unless the base image
# lacks Python, in which case apt installs it. Uses only classic-builder features.
#
#   docker build --build-arg BASE_IMAGE=... --build-arg MAP_UID=1000 --build-arg MAP_GID=1000 -t NAME:VERSION DIR

ARG BASE_IMAGE=segmap/base-cpu:bookworm

# --- Python on top of the base image (CUDA runtime images come without it) --------------------------------------
FROM ${BASE_IMAGE} AS python
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- Third-party packages, from the wheelhouse only; the wheels stay out of the final image ----------------------
FROM python AS deps
COPY requirements.txt requirements-nodeps.txt /tmp/
COPY wheelhouse/deps/ /tmp/wheelhouse/
RUN set -e; \
    python3 -m venv /opt/holoscan/venv; \
    pip="/opt/holoscan/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse"; \
    if grep -q '^[^#[:space:]]' /tmp/requirements.txt; then $pip -r /tmp/requirements.txt; fi; \
    if grep -q '^[^#[:space:]]' /tmp/requirements-nodeps.txt; then $pip --no-deps -r /tmp/requirements-nodeps.txt; fi

# --- The MAP ---------------------------------------------------------------------------------------------------------
FROM python
ARG MAP_UID=1000
ARG MAP_GID=1000

ENV VIRTUAL_ENV=/opt/holoscan/venv \
    PATH=/opt/holoscan/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/holoscan \
    HOLOSCAN_APPLICATION=/opt/holoscan/app \
    HOLOSCAN_INPUT_PATH=/var/holoscan/input \
    HOLOSCAN_OUTPUT_PATH=/var/holoscan/output \
    HOLOSCAN_MODEL_PATH=/opt/holoscan/models \
    HOLOSCAN_WORKDIR=/var/holoscan \
    HOLOSCAN_CONFIG_PATH=/var/holoscan/app.yaml \
    HOLOSCAN_APP_MANIFEST_PATH=/etc/holoscan/app.json \
    HOLOSCAN_PKG_MANIFEST_PATH=/etc/holoscan/pkg.json \
    HOLOSCAN_LOGS_PATH=/var/holoscan/logs \
    HOLOSCAN_TIMEOUT=0

# The user may already exist in the base image (Ubuntu images have uid 1000): reuse it then.
RUN set -e; \
    getent group "${MAP_GID}" >/dev/null || groupadd --gid "${MAP_GID}" holoscan; \
    getent passwd "${MAP_UID}" >/dev/null \
        || useradd --uid "${MAP_UID}" --gid "${MAP_GID}" --no-create-home --home-dir /var/holoscan \
           --shell /usr/sbin/nologin holoscan; \
    mkdir -p /opt/holoscan /etc/holoscan /var/holoscan/input /var/holoscan/output /var/holoscan/logs; \
    chown "${MAP_UID}:${MAP_GID}" /var/holoscan /var/holoscan/output /var/holoscan/logs

COPY --from=deps /opt/holoscan/venv /opt/holoscan/venv
COPY wheelhouse/segmap/ /tmp/segmap-wheel/
# Holoscan links against libcudart, which no CPU base image has: the CUDA runtime wheel's copy goes last on the
# loader's path, after the base image's own. Importing the SDK once as root lets Holoscan's wheel make its library
# links (it does so the first time Python starts) and checks that the environment is complete.
RUN set -e; \
    /opt/holoscan/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/segmap-wheel/*.whl; \
    rm -rf /tmp/segmap-wheel; \
    find /opt/holoscan/venv -path '*/nvidia/*' -name 'libcudart.so.*' -printf '%h\n' | sort -u \
        > /etc/ld.so.conf.d/zz-segmap-cuda.conf; \
    ldconfig; \
    /opt/holoscan/venv/bin/python -W ignore -c "import importlib.util as u; \
[__import__(m) for m in ('holoscan.core', 'monai.deploy.core') if u.find_spec(m.split('.')[0])]"

COPY app/ /opt/holoscan/app/
COPY models/ /opt/holoscan/models/
COPY task/ /opt/holoscan/task/
COPY app.json pkg.json /etc/holoscan/
COPY app.yaml tools /var/holoscan/

WORKDIR /var/holoscan
USER ${MAP_UID}:${MAP_GID}
ENTRYPOINT ["/var/holoscan/tools"]
CMD []
