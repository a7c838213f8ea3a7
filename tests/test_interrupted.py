"""Killed and concurrent runs, in real processes: nothing that looks finished is left, a rerun succeeds, and of two
runs writing one output the one that holds it wins while the other fails at once with one clear line.

Runs are paused with SIGSTOP at the moment under test instead of raced against a clock, so these tests do not depend
on the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

LAYERS = 12
DIM = 768  # 12 × 768×768 fp32 ≈ 28 MB, written as 1 MB shards: the writing phase is many files long


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    g = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    save_file(
        {f"layers.{i}.proj.weight": torch.randn(DIM, DIM, generator=g) for i in range(LAYERS)},
        base / "model.safetensors",
    )
    (base / "config.json").write_text(json.dumps({"model_type": "generated", "tie_word_embeddings": False}))
    adapter = root / "adapter"
    adapter.mkdir()
    save_file(
        {
            f"base_model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.01
            for i in range(LAYERS)
            for ab, shape in (("A", (8, DIM)), ("B", (DIM, 8)))
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["proj"]})
    )
    return base, adapter


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_export", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def wait_for(proc: subprocess.Popen[str], condition, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def written_shards(out: Path) -> int:
    return sum(1 for p in partials(out) for f in p.glob("*.safetensors") if f.stat().st_size > 0)


def looks_finished(parent: Path, inputs: set[str]) -> list[str]:
    """Anything outside hidden temporary folders that a user or a deploy script could take for an output."""
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith(".") and p.name not in inputs)


def test_killed_merge_leaves_nothing_finished_and_rerun_succeeds(model: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = model
    out = tmp_path / "merged"
    proc = start("merge", str(base), str(adapter), "-o", str(out), "--max-shard-size", "1MB", "-q")
    wait_for(proc, lambda: written_shards(out) >= 3, "three shards were written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert looks_finished(tmp_path, set()) == []
    assert partials(out), "the killed run's temporary folder is where it was"
    done = start("merge", str(base), str(adapter), "-o", str(out), "--max-shard-size", "1MB", "-q")
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert partials(out) == [] and not (tmp_path / f".{out.name}.lock").exists()
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
    assert len(merged) == LAYERS
    assert json.loads((out / "lora_export.json").read_text())["output"]["files"]


def test_killed_merge_and_onnx_leaves_nothing_finished_and_rerun_succeeds(models_dir: Path, tmp_path: Path) -> None:
    from conftest import make_adapter

    adapter = make_adapter(models_dir / "llama", tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "onnx"
    args = ("merge-and-onnx", str(models_dir / "llama"), str(adapter), "-o", str(out), "--max-new-tokens", "2")
    proc = start(*args)
    wait_for(
        proc,
        lambda: any((p / "merged" / "lora_export.json").is_file() for p in partials(out)),
        "the merge inside the export finished",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert looks_finished(tmp_path, {"adapter"}) == []
    done = start(*args)
    _, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert partials(out) == []


def test_two_runs_one_output_one_wins(model: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = model
    out = tmp_path / "merged"
    first = start("merge", str(base), str(adapter), "-o", str(out), "--max-shard-size", "1MB", "-q")
    wait_for(first, lambda: written_shards(out) >= 1, "the first run started writing")
    first.send_signal(signal.SIGSTOP)  # hold it mid-write while the second run tries
    try:
        second = start("merge", str(base), str(adapter), "-o", str(out), "--overwrite", "-q")
        _, stderr = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"another lora-export run (pid {first.pid}) is writing {out}" in errors[0], stderr
    assert "Traceback" not in stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "lora_export.json").is_file()
    assert partials(out) == []
    late = start("merge", str(base), str(adapter), "-o", str(out), "-q")  # after the winner: the output exists
    _, stderr = late.communicate(timeout=300)
    assert late.returncode == 2 and "already exists: pass --overwrite" in stderr


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C at every phase of merge-and-onnx through the GenAI builder (issue 24): the terminal's SIGINT reaches the whole
# process group — lora-export and the builder's child — and each interrupted run ends with exit 130, one `Error:` line,
# no output, no temporary folder, no lock and no builder left running; the rerun after them succeeds.

REPO = Path(__file__).resolve().parent.parent
PHASES = ("verifying merged vs unmerged", "the builder's child process", "checking in ONNX Runtime GenAI")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/make_tiny_model.py's LLaMA (with a tokenizer, for the builder) and its adapter."""
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(root)], check=True)
    return root


def start_session(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A run in its own process group (a terminal's foreground job), its stderr lines collected as they come."""
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_export", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    return proc, lines


def processes_writing(out: Path) -> list[int]:
    """Live processes whose command line names this output's temporary folder (the builder's child writes there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if f".{out.name}.partial-" in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_in_every_phase_of_a_genai_export(tiny: Path, tmp_path: Path, phase: str) -> None:
    out = tmp_path / "onnx"
    args = ("merge-and-onnx", str(tiny / "base"), str(tiny / "adapter"), "-o", str(out), "--exporter", "genai",
            "--max-new-tokens", "2")  # fmt: skip
    proc, lines = start_session(*args)
    if phase == "the builder's child process":
        wait_for(proc, lambda: processes_writing(out), phase)
    else:
        wait_for(proc, lambda: any(line.startswith(phase) for line in lines), phase)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    proc.wait(timeout=120)
    time.sleep(0.2)  # the reader thread's last lines
    errors = [line for line in lines if line.startswith("Error: ")]
    assert proc.returncode == 130, lines
    assert len(errors) == 1 and "interrupted" in errors[0] and not any("Traceback" in x for x in lines), lines
    assert not out.exists() and partials(out) == [] and not (tmp_path / f".{out.name}.lock").exists()
    deadline = time.monotonic() + 10
    while processes_writing(out) and time.monotonic() < deadline:  # a child killed by its parent is reaped by init
        time.sleep(0.05)
    assert processes_writing(out) == [], "the builder's child outlived the interrupted run"
    if phase == PHASES[-1]:  # after the last phase's interrupt: the same command succeeds
        done, lines = start_session(*args)
        assert done.wait(timeout=600) == 0, lines
        assert (out / "model.onnx").is_file() and partials(out) == []


def test_two_package_runs_one_output(tiny: Path, tmp_path: Path) -> None:
    """Two `package` runs writing one output: the second fails at once naming the first's pid; the first's package
    passes --check."""
    (tmp_path / "variants.yaml").write_text(f"variants:\n  caps:\n    adapters: [{tiny / 'adapter'}]\n")
    out = tmp_path / "pkg"
    args = ("package", str(tiny / "base"), "--variants", str(tmp_path / "variants.yaml"), "-o", str(out), "--mode",
            "merged")  # fmt: skip
    first, _ = start_session(*args)
    wait_for(first, lambda: bool(partials(out)), "the first run started writing")
    os.killpg(first.pid, signal.SIGSTOP)  # hold it mid-write while the second run tries
    try:
        second = start(*args, "--overwrite")
        _, stderr = second.communicate(timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert second.returncode == 2 and len(errors) == 1, stderr
    assert f"another lora-export run (pid {first.pid}) is writing {out}" in errors[0], stderr
    assert first.wait(timeout=600) == 0
    check = start("package", "--check", str(out))
    _, stderr = check.communicate(timeout=300)
    assert check.returncode == 0, stderr
