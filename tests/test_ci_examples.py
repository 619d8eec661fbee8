"""The example CI jobs (examples/ci) are valid for their CI and run what .ci/run runs here.

Each file is checked against its CI's published schema (the copies that
check-jsonschema ships, so no network), and its `docker run` against
scripts/test-in-container.sh: the same image target, the same way into the
host's engine and network, the same privileged test selection.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "ci"
SCRIPT = (ROOT / "scripts" / "test-in-container.sh").read_text()
SCHEMAS = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_example_is_valid_for_its_ci(name):
    done = check_jsonschema(SCHEMAS[name], EXAMPLES / name)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_broken_job_is_caught_by_the_same_check(name, tmp_path):
    """The schema check has teeth: a misspelt key in each file fails it."""
    broken = tmp_path / name
    text = (EXAMPLES / name).read_text()
    broken.write_text(text.replace("runs-on:", "runs_on:") if "github" in name else text.replace("script:", "scripts:"))
    assert check_jsonschema(SCHEMAS[name], broken).returncode != 0


def docker_runs(name: str) -> list[list[str]]:
    """The `docker ...` commands of a job file's steps, as argument lists."""
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    if "github" in name:
        commands = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    else:
        commands = [line for job in doc.values() if isinstance(job, dict) and "script" in job for line in job["script"]]
    return [shlex.split(command) for command in commands if command.startswith("docker ")]


def options(argv: list[str]) -> set[str]:
    """`--flag` and `--flag value` options of a docker run (values joined to their flag)."""
    found, i = set(), 0
    while i < len(argv):
        if argv[i] in ("--network", "--pid", "-v", "-e"):
            found.add(f"{argv[i]} {argv[i + 1].split('=')[0]}")
            i += 2
        else:
            if argv[i].startswith("--"):
                found.add(argv[i])
            i += 1
    return found


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_example_runs_the_suite_as_test_in_container_does(name):
    runs = docker_runs(name)
    assert ["docker", "build", "--target", "test", "-t", "kaobs/kaobs-test:local", "."] in runs
    [suite] = [argv for argv in runs if argv[:2] == ["docker", "run"]]
    used = options(suite)
    for wanted in ("--rm", "--privileged", "--network host", "--pid host", "-v /var/run/docker.sock:/var/run/docker.sock",
                   "-v /tmp:/tmp", "-e KAOBS_REQUIRE_PRIVILEGED"):
        assert wanted in used, (wanted, suite)
        # ... and the script .ci/run calls does the same
        flag, _, value = wanted.partition(" ")
        assert re.search(re.escape(flag) + (r"\s+" + re.escape(value) if value else r"\b"), SCRIPT), wanted
    assert suite[-6:] == ["python3", "-m", "pytest", "-q", "-ra", "-m", "privileged"][-6:]
    assert "-m privileged" in SCRIPT and "kaobs/kaobs-test:local" in SCRIPT


def test_the_test_image_carries_the_whole_repository():
    """The test stage copies every top-level file and folder a clone has (a missing one failed in the image only)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tops = {path.split("/")[0] for path in tracked} - {".dockerignore", ".gitignore"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = dockerfile[dockerfile.index("AS test"):]
    copied = set()
    for line in stage.splitlines():
        if line.startswith("COPY ") and line.split()[-1].startswith("/kaobs"):
            copied.update(line.split()[1:-1])
    assert tops - copied == set()
