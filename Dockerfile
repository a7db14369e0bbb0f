# meshgate's container image: the gateway (`meshgate run`) on a slim Python base.
#   make image                    -> meshgate:<version from pyproject.toml>
#   docker build -t meshgate:dev .
# The helm chart (charts/meshgate) runs this image as user 10001 with a read-only
# root filesystem; nothing here writes outside /tmp at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install meshgate and its dependencies into a self-contained venv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Binary wheels cover uvloop, httptools, aioquic and cryptography on amd64 and arm64;
# the compiler is here for platforms where pip has to build one of them, and it
# stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The bytecode is compiled here and kept: at run time the root filesystem is
# read-only and PYTHONDONTWRITEBYTECODE is set, so a module without its .pyc would be
# compiled from source again by every worker at every start (about 0.6 s and 4 MB of
# RSS per worker, docs/performance.md, "Bytecode in the image").
RUN python -m venv /opt/meshgate \
 && /opt/meshgate/bin/pip install . \
 && /opt/meshgate/bin/pip uninstall -y pip \
 && find /opt/meshgate -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/meshgate/bin/python -m compileall -q -j 0 /opt/meshgate

# ---- run: the venv and a non-root user, nothing else
FROM ${PYTHON_IMAGE}
# The base image ships the standard library without its .pyc files; compile them once
# here, for the reason above (its own site-packages, pip and setuptools, are not used).
RUN python -m compileall -q -j 0 -x /site-packages/ \
      "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
 && groupadd --system --gid 10001 meshgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin meshgate
COPY --from=build /opt/meshgate /opt/meshgate
ENV PATH=/opt/meshgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# Gateway listeners come from the configuration; these are the chart's defaults.
EXPOSE 80/tcp 443/tcp 443/udp 15000/tcp
ENTRYPOINT ["meshgate"]
CMD ["run", "/etc/meshgate/config", "--address", "0.0.0.0"]
