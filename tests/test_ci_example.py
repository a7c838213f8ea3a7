"""examples/ci/lora-export-gate.yml: its shell steps, run as GitHub Actions would run them, on a tiny model.

Steps are run in order with `bash -eo pipefail`, the workflow's environment, and GitHub's rule that after a failed step
only `if: always()` steps run. Install steps are skipped (the package under test is already installed) and `uses:`
steps are actions, not commands: the files the upload steps name are checked to exist instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, make_adapter

WORKFLOW = REPO / "examples" / "ci" / "lora-export-gate.yml"


def run_job(
    workflow: dict[str, Any], job: str, repo: Path, only: str | None = None
) -> tuple[bool, dict[str, subprocess.CompletedProcess[str]]]:
    """Run a job's shell steps in `repo`; return (job passed, {step name: result})."""
    env = {**os.environ, **workflow.get("env", {}), **workflow["jobs"][job].get("env", {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GITHUB_STEP_SUMMARY"] = str(repo / "step-summary.md")
    passed, results = True, {}
    for step in workflow["jobs"][job]["steps"]:
        name = step.get("name", step.get("uses", ""))
        if "run" not in step or name.startswith("Install") or (only and name != only):
            continue
        if not passed and "always()" not in str(step.get("if", "")):
            continue
        results[name] = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        passed = passed and results[name].returncode == 0
    return passed, results


def uploaded_paths(workflow: dict[str, Any], job: str) -> list[str]:
    paths = []
    for step in workflow["jobs"][job]["steps"]:
        if str(step.get("uses", "")).startswith("actions/upload-artifact"):
            paths += [line.strip() for line in step["with"]["path"].splitlines() if line.strip()]
    return paths


def assert_job_passes(workflow: dict[str, Any], job: str, root: Path) -> None:
    """The job's steps all succeed and every path its upload steps name exists."""
    passed, results = run_job(workflow, job, root)
    assert passed, {k: (r.returncode, r.stderr[-2000:]) for k, r in results.items()}
    for path in uploaded_paths(workflow, job):
        assert (root / path).exists(), path


def junit_counts(path: Path) -> tuple[int, int]:
    suite = ET.parse(path).getroot().find("testsuite")
    return int(suite.get("tests")), int(suite.get("failures"))


@pytest.fixture()
def repo(models_dir: Path, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A user's repository laid out as the workflow's env expects: models/base, adapters/my-task, variants.yaml."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    repo = tmp_path / "repo"
    env = workflow["env"]
    shutil.copytree(models_dir / "llama", repo / env["BASE"])
    make_adapter(repo / env["BASE"], repo / env["ADAPTER"], target_modules=["q_proj", "v_proj"])
    make_adapter(repo / env["BASE"], repo / "adapters" / "other", seed=3, target_modules=["q_proj", "o_proj"])
    (repo / env["VARIANTS"]).write_text(
        f"variants:\n  my-task:\n    adapters: [{env['ADAPTER']}]\n  other:\n    adapters: [adapters/other]\n"
    )
    return workflow, repo


def test_gate_job_passes_and_writes_its_reports(repo: tuple[dict[str, Any], Path]) -> None:
    workflow, root = repo
    assert_job_passes(workflow, "gate", root)
    tests, failures = junit_counts(root / "build" / "reports" / "merge-and-onnx.xml")
    assert tests >= 5 and failures == 0
    assert "onnx vs pytorch" in (root / "step-summary.md").read_text()


def test_gate_job_fails_on_a_broken_adapter(repo: tuple[dict[str, Any], Path]) -> None:
    workflow, root = repo
    weights = root / workflow["env"]["ADAPTER"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    passed, results = run_job(workflow, "gate", root)
    assert not passed
    step = results["Merge, verify, export ONNX, verify in ONNX Runtime"]
    assert step.returncode == 2 and "truncated" in step.stderr and "Traceback" not in step.stderr
    assert "Job summary" in results, "an `if: always()` step still runs after the failure"


def test_package_job_passes_then_fails_on_a_changed_file(repo: tuple[dict[str, Any], Path]) -> None:
    workflow, root = repo
    assert_job_passes(workflow, "package", root)
    xml = root / "build" / "reports" / "package-check.xml"
    tests, failures = junit_counts(xml)
    assert tests == 4 and failures == 0  # files, shared without adapter, shared + each of the two adapter files

    adapter_file = next((root / "build" / "tasks" / "shared").glob("*.onnx_adapter"))
    data = bytearray(adapter_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter_file.write_bytes(bytes(data))
    passed, results = run_job(workflow, "package", root, only="Check the package as a deploy step would")
    assert not passed and results["Check the package as a deploy step would"].returncode == 1
    tests, failures = junit_counts(xml)
    assert failures == 1
    failure = ET.parse(xml).getroot().find("testsuite").find("testcase").find("failure")
    assert failure is not None and adapter_file.name in failure.text


def test_fleet_workflow_builds_parts_per_variant_and_assembles_them(repo: tuple[dict[str, Any], Path]) -> None:
    """examples/ci/lora-export-fleet.yml: the variants job's matrix, one part job per variant (its VARIANT as the
    matrix sets it), the artifacts as download-artifact lays them out (parts/part-NAME/), then the assemble job."""
    _, root = repo
    fleet = yaml.safe_load((REPO / "examples" / "ci" / "lora-export-fleet.yml").read_text())
    output = root / "github-output"
    os.environ["GITHUB_OUTPUT"] = str(output)
    try:
        passed, results = run_job(fleet, "variants", root)
    finally:
        del os.environ["GITHUB_OUTPUT"]
    assert passed, {k: r.stderr for k, r in results.items()}
    names = json.loads(output.read_text().split("names=", 1)[1])
    assert names == ["my-task", "other"]
    for name in names:
        fleet["jobs"]["part"]["env"]["VARIANT"] = name
        passed, results = run_job(fleet, "part", root)
        assert passed, {k: r.stderr[-2000:] for k, r in results.items()}
        shutil.copytree(root / "parts" / name, root / "downloaded" / f"part-{name}")  # an artifact: links become copies
    shutil.rmtree(root / "parts")
    (root / "downloaded").rename(root / "parts")
    assert_job_passes(fleet, "assemble", root)
    tests, failures = junit_counts(root / "build" / "reports" / "package-check.xml")
    assert tests >= 4 and failures == 0
