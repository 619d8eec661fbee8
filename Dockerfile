# kaobs in a container: `kaobs watch` on the host's network, the Docker socket read-only for discovery.
#
#   docker build -t kaobs .                      # anywhere: FROM the official Python image, deps from PyPI
#   bash scripts/build-kaobs-image.sh            # here: FROM a debootstrapped Debian base, no registry, offline
#
#   docker run --rm --network host --cap-drop ALL --cap-add NET_RAW \
#       -v /var/run/docker.sock:/var/run/docker.sock:ro kaobs watch --metrics :9432
#
# Targets: `runtime` (the default, what users run) and `test` (runtime plus pytest, tshark,
# tcpdump, prometheus and the Docker client: the privileged validation suite runs in it).
# A build context holding `.wheels/` (Python wheels) and `.debs/` (Debian packages) installs
# from those and needs no network; scripts/build-kaobs-image.sh prepares such a context.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS runtime
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
# libpcap compiles filter expressions (pcapy-ng); iproute2 and procps serve `kaobs lab` and the
# namespace sysctls. The local base has them already; the official image gets them from Debian.
RUN if ! dpkg -s libpcap0.8 iproute2 procps >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends libpcap0.8 iproute2 procps \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY pyproject.toml README.md /src/
COPY kaobs /src/kaobs
COPY sniffer /src/sniffer
COPY analysis /src/analysis
COPY pyproject.toml .wheels* /wheels/
RUN if ls /wheels/*.whl >/dev/null 2>&1; then pip install --no-index --find-links /wheels /src; \
    else pip install /src; fi \
    && rm -rf /src/build /src/*.egg-info && kaobs --version
# Prometheus scrapes `kaobs watch --metrics :9432` here.
EXPOSE 9432
ENTRYPOINT ["kaobs"]
CMD ["watch"]

FROM runtime AS test
COPY pyproject.toml .debs* /debs/
RUN export DEBIAN_FRONTEND=noninteractive; \
    if ls /debs/*.deb >/dev/null 2>&1; then dpkg -i /debs/*.deb >/dev/null; \
    else apt-get update && apt-get install -y --no-install-recommends tshark tcpdump prometheus docker.io iptables \
        && rm -rf /var/lib/apt/lists/*; fi \
    && rm -rf /debs
RUN if ls /wheels/*.whl >/dev/null 2>&1; then pip install --no-index --find-links /wheels '/src[test]'; \
    else pip install '/src[test]'; fi
# The repository as a clone has it (not the wheels and packages of the build context).
COPY pyproject.toml README.md Dockerfile /kaobs/
COPY kaobs /kaobs/kaobs
COPY sniffer /kaobs/sniffer
COPY analysis /kaobs/analysis
COPY tests /kaobs/tests
COPY captures /kaobs/captures
COPY bench /kaobs/bench
COPY scripts /kaobs/scripts
COPY docs /kaobs/docs
COPY deploy /kaobs/deploy
COPY examples /kaobs/examples
COPY .ci /kaobs/.ci
WORKDIR /kaobs
ENTRYPOINT []
CMD ["python3", "-m", "pytest", "-q", "-ra", "-m", "privileged"]
