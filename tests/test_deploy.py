"""deploy/kubernetes: the DaemonSet is valid Kubernetes and runs a kaobs command that parses.

No cluster runs here: the manifest is validated against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields are errors) for the
oldest supported and the newest release it knows, and the container's
arguments are parsed by kaobs's own command line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from kaobs.cli import main as kaobs_main

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "kaobs-daemonset.yaml"


def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
def test_daemonset_is_valid_kubernetes(version):
    done = validate(MANIFEST, version)
    assert done.returncode == 0, done.stdout + done.stderr


def test_validation_has_teeth(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("hostNetwork: true", "hostNetwrk: true"))
    assert validate(broken, "1.30.0").returncode != 0


def daemonset() -> dict:
    [ds] = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc["kind"] == "DaemonSet"]
    return ds


def test_daemonset_asks_for_the_least_it_needs():
    pod = daemonset()["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    security = container["securityContext"]
    assert spec["hostNetwork"] is True and not spec.get("hostPID") and "privileged" not in security
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
    port = container["ports"][0]["containerPort"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert container["livenessProbe"]["httpGet"]["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    args = container["args"]
    assert args[args.index("--metrics") + 1].endswith(f":{port}")


def test_daemonset_arguments_parse_as_a_kaobs_command():
    [container] = daemonset()["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    command = kaobs_main.get_command(click.Context(kaobs_main), args[0])
    assert command is not None, args[0]
    context = command.make_context(args[0], list(args[1:]))  # raises on an unknown option or a bad value
    assert context.params["interfaces"] == ("any",)
