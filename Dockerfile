# A MONAI Application Package (MAP) made by segmap.
#
# Build context: a folder written by `segmap package ... --dry-run DIR` (app/, models/, task/, app.yaml, app.json,
# pkg.json, tools, requirements*.txt, wheelhouse/). Nothing is fetched from the network unless the base image
# lacks Python or tini, in which case apt installs them. Uses only classic-builder features.
#
#   docker build --build-arg BASE_IMAGE=... --build-arg MAP_UID=65532 --build-arg MAP_GID=65532 -t NAME:VERSION DIR
#
# Stages: python (base + Python + tini) -> deps (the third-party venv, pruned to what runs) -> segmap (the segmap
# wheel, installed apart so that a code change does not rebuild the venv layer) -> runtime (the final root file
# system without package managers, pip or setuid bits) -> the image, FROM scratch: no wheel, no apt/dpkg, no pip and
# no build tool is left in any of its layers.

ARG BASE_IMAGE=segmap/base-cpu:bookworm-tini

# --- Python and tini on top of the base image (CUDA runtime images come without them) ------------------------------
FROM ${BASE_IMAGE} AS python
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1 || ! command -v tini >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
           ca-certificates tini \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- Third-party packages, from the wheelhouse only, then pruned ---------------------------------------------------
# Removed after installing: test suites (torch's C++ test binaries, test data with private keys that secret
# scanners flag), C/C++ headers and static libraries, torch's command-line tools except torch_shm_manager (used by
# torch.multiprocessing), sympy/mpmath (only torch's compiler imports them; TorchScript inference does not), and
# pip/setuptools. torch's two large libraries lose their symbol tables (strip --strip-unneeded, where the base has
# binutils: about 90 MB; other wheels' libraries are left alone, auditwheel's patchelf edits do not survive strip).
# Nothing is byte-compiled at install: the import check at the end (which fails the build if the pruning removed
# something that is imported) compiles what a run imports, so the image carries no .pyc files that nothing loads.
FROM python AS deps
COPY requirements.txt requirements-nodeps.txt /tmp/
COPY wheelhouse/deps/ /tmp/wheelhouse/
RUN set -e; \
    python3 -m venv /opt/holoscan/venv; \
    pip="/opt/holoscan/venv/bin/pip install --no-cache-dir --no-compile --no-index --find-links /tmp/wheelhouse"; \
    if grep -q '^[^#[:space:]]' /tmp/requirements.txt; then $pip -r /tmp/requirements.txt; fi; \
    if grep -q '^[^#[:space:]]' /tmp/requirements-nodeps.txt; then $pip --no-deps -r /tmp/requirements-nodeps.txt; fi; \
    rm -rf /tmp/wheelhouse /tmp/requirements*.txt; \
    site="$(/opt/holoscan/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    find "${site}" -depth -type d \( -name tests -o -name test \) -exec rm -rf {} +; \
    find "${site}" -depth -type d -name include -exec rm -rf {} +; \
    rm -rf /opt/holoscan/venv/include; \
    find "${site}" -type f \( -name '*.a' -o -name '*.h' -o -name '*.hpp' -o -name '*.cuh' \) -delete; \
    if [ -d "${site}/torch/bin" ]; then \
        find "${site}/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    fi; \
    if [ -d "${site}/torch" ]; then rm -rf "${site}"/sympy "${site}"/sympy-* "${site}"/mpmath "${site}"/mpmath-*; fi; \
    rm -rf "${site}"/pip "${site}"/pip-* "${site}"/setuptools "${site}"/setuptools-* "${site}"/_distutils_hack \
        "${site}"/distutils-precedence.pth "${site}"/pkg_resources /opt/holoscan/venv/bin/pip*; \
    if command -v strip >/dev/null 2>&1; then \
        for lib in "${site}"/torch/lib/libtorch_cpu.so "${site}"/torch/lib/libtorch_python.so; do \
            if [ -f "${lib}" ]; then strip --strip-unneeded "${lib}"; fi; \
        done; \
    fi; \
    echo /opt/holoscan/python > "${site}/segmap.pth"; \
    find /opt/holoscan/venv -path '*/nvidia/*' -name 'libcudart.so.*' -printf '%h\n' | sort -u \
        > /etc/ld.so.conf.d/zz-segmap-cuda.conf; \
    ldconfig; \
    /opt/holoscan/venv/bin/python -W ignore -c "import importlib.util as u; \
[__import__(m) for m in ('torch', 'torch.jit', 'numpy', 'scipy.ndimage', 'pydicom', 'pydicom.pixels', 'highdicom', \
'highdicom.seg', 'nibabel', 'yaml', 'pylibjpeg', 'holoscan.core', 'holoscan.conditions', 'monai.deploy.core') \
if u.find_spec(m.split('.')[0])]"

# --- segmap itself, apart from the venv (a code change rebuilds only this small layer) ---------------------------
FROM deps AS segmap
COPY wheelhouse/segmap/ /tmp/segmap-wheel/
RUN set -e; \
    python3 -m venv /tmp/pipenv; \
    /tmp/pipenv/bin/pip install --no-cache-dir --no-index --no-deps --target /opt/holoscan/python \
        /tmp/segmap-wheel/*.whl; \
    rm -rf /opt/holoscan/python/bin

# --- The run-time root file system: no package managers, no pip, no setuid/setgid bits -----------------------------
FROM deps AS runtime
ARG MAP_UID=65532
ARG MAP_GID=65532
# The user may already exist in the base image: reuse it then. Importing the SDK once as root lets Holoscan's wheel
# make its library links (it does so the first time Python starts).
RUN set -e; \
    getent group "${MAP_GID}" >/dev/null || groupadd --gid "${MAP_GID}" holoscan; \
    getent passwd "${MAP_UID}" >/dev/null \
        || useradd --uid "${MAP_UID}" --gid "${MAP_GID}" --no-create-home --home-dir /var/holoscan \
           --shell /usr/sbin/nologin holoscan; \
    mkdir -p /opt/holoscan/python /etc/holoscan /var/holoscan/input /var/holoscan/output /var/holoscan/logs; \
    chown "${MAP_UID}:${MAP_GID}" /var/holoscan /var/holoscan/output /var/holoscan/logs; \
    echo "${MAP_UID}:${MAP_GID}" > /etc/holoscan/run-as; \
    /opt/holoscan/venv/bin/python -W ignore -c "import importlib.util as u; \
[__import__(m) for m in ('holoscan.core', 'monai.deploy.core') if u.find_spec(m.split('.')[0])]"; \
    find / -xdev -type f -perm /6000 -exec chmod ug-s {} +; \
    for pkg in $(dpkg-query -W -f '${Package}\n' 2>/dev/null | grep -E '^(binutils|libbinutils|libctf|libgprofng|libsframe|libjansson)'); do \
        dpkg -L "${pkg}" | while read -r f; do if [ -f "${f}" ] || [ -L "${f}" ]; then rm -f "${f}"; fi; done; \
    done; \
    rm -rf /usr/bin/apt* /usr/lib/apt /var/lib/apt /var/cache/apt /etc/apt /usr/bin/dpkg* /var/lib/dpkg \
        /usr/bin/perl* /usr/lib/x86_64-linux-gnu/perl* /usr/share/perl* /usr/lib/aarch64-linux-gnu/perl* \
        /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/python-wheels \
        /usr/lib/python3*/ensurepip /usr/lib/python3*/test /usr/include /usr/local/include /usr/sbin/useradd /usr/sbin/groupadd /usr/sbin/usermod /usr/bin/su \
        /usr/bin/passwd /usr/bin/chsh /usr/bin/chfn /usr/bin/newgrp /usr/bin/gpasswd /usr/bin/mount /usr/bin/umount \
        /root/.cache /tmp/* /var/log/*

FROM scratch
ARG MAP_UID=65532
ARG MAP_GID=65532
ARG CREATED=unknown
ARG REVISION=unknown
ARG IMAGE_REF=unknown
COPY --from=runtime / /
COPY --from=segmap /opt/holoscan/python/ /opt/holoscan/python/

# Threads follow the container's CPU quota unless SEGMAP_THREADS says otherwise; files are written 0640 unless
# SEGMAP_UMASK says otherwise (see README, settings). SEGMAP_IMAGE_* identify the image in every run report.
ENV VIRTUAL_ENV=/opt/holoscan/venv \
    PATH=/opt/holoscan/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
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
    HOLOSCAN_TIMEOUT=0 \
    SEGMAP_IMAGE_REF=${IMAGE_REF} \
    SEGMAP_IMAGE_REVISION=${REVISION} \
    SEGMAP_IMAGE_CREATED=${CREATED}

COPY app/ /opt/holoscan/app/
COPY models/ /opt/holoscan/models/
COPY task/ /opt/holoscan/task/
COPY app.json pkg.json run_as.py /etc/holoscan/
COPY app.yaml tools /var/holoscan/

WORKDIR /var/holoscan
# Starts as root so that the entry point can take the output folder's owner (MAIA's `docker run` has no --user); it
# switches to that user (or to MAP_UID:MAP_GID, /etc/holoscan/run-as, for a root-owned folder) before anything else
# runs, so the application never runs as root; a root-owned folder that user cannot write receives the outputs from
# a root supervisor after the run (/etc/holoscan/run_as.py). `docker run --user UID:GID` skips the switch.
USER 0:0
# tini is PID 1: it forwards docker stop's SIGTERM to the application (which stops within a second, removes its
# staging folder and exits 143) and reaps stray children. No HEALTHCHECK: a MAP is a batch job that runs once and
# exits; its exit code and run_report.json are the health signal, and a probe would only add a process.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/var/holoscan/tools"]
CMD []
