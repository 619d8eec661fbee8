"""Shared test policy: privileged tests run for real as root and say why they skip otherwise.

A test marked `privileged` needs root (packet capture, network namespaces) and
a Docker engine. Without root it is skipped with that reason. In CI
(`KAOBS_REQUIRE_PRIVILEGED=1`, set by .ci/run) nothing is skipped: a missing
engine is a failure, so a green CI always means the privileged suite ran.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REQUIRE = os.environ.get("KAOBS_REQUIRE_PRIVILEGED") == "1"


def _docker_reachable() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed (bash scripts/setup.sh installs it)"
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the Docker engine does not answer ({error})"
    if done.returncode != 0:
        return "the Docker engine is not running (bash scripts/setup.sh starts it)"
    return None


def privileged_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for packet capture, network namespaces and Docker; run as root (CI does)"
    return _docker_reachable()


def pytest_collection_modifyitems(config, items):
    privileged = [item for item in items if item.get_closest_marker("privileged")]
    if not privileged:
        return
    reason = privileged_skip_reason()
    if reason is None:
        return
    if REQUIRE:
        raise pytest.UsageError(f"KAOBS_REQUIRE_PRIVILEGED=1 but privileged tests cannot run: {reason}")
    for item in privileged:
        item.add_marker(pytest.mark.skip(reason=reason))
