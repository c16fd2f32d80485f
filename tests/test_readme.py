"""The README's examples are run as written, and CI runs the README's commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.registry
def test_readme_python_examples_run():
    blocks = code_blocks("python")
    assert blocks, "the README must hold a Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.registry
def test_readme_yaml_is_the_example_config():
    full_configs = [yaml.safe_load(block) for block in code_blocks("yaml") if block.startswith("model:")]
    assert len(full_configs) == 1
    config = yaml.safe_load((ROOT / "examples" / "segmentation.yaml").read_text())
    assert full_configs[0]["model"] == config["model"]


@pytest.mark.registry
def test_readme_technique_snippet_builds_a_quantized_lora_backbone():
    from terratorch.registry import BACKBONE_REGISTRY

    (snippet,) = [block for block in code_blocks("yaml") if "backbone_quantization" in block]
    model_args = yaml.safe_load(snippet)
    name = model_args.pop("backbone")
    kwargs = {key.removeprefix("backbone_"): value for key, value in model_args.items()}
    backbone = BACKBONE_REGISTRY.build(name, preset="tiny", **kwargs)
    assert backbone.optimized.quantized_layers and backbone.optimized.lora_targets
    assert backbone.optimized.checkpointing


@pytest.mark.registry
def test_ci_runs_the_readme_quick_start():
    commands = [line for block in code_blocks("bash") for line in block.splitlines() if "pip install" in line]
    quick_start = commands[:2]
    assert any("earthmind-compat check" in c for c in quick_start)
    assert any('pytest -m "not gpu"' in c for c in quick_start)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in quick_start:
        assert command in ci, f".ci/run must run the README command {command!r}"


def _cli(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from earthmind_compat.cli import main as earthmind_compat

    directory = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", directory / "examples")
    # the README's `earthmind-compat synthetic-data data`, in process: the console script's cold start is
    # exercised by the fit below
    assert earthmind_compat(["synthetic-data", str(directory / "data")]) == 0
    return directory


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.e2e
def test_readme_fit_through_our_cli(workdir):
    _run([_cli("earthmind-compat"), "fit", "-c", "examples/segmentation.yaml"], workdir)
    assert list((workdir / "runs" / "segmentation" / "checkpoints").glob("*.ckpt"))


@pytest.mark.e2e
def test_readme_plain_terratorch_fit_with_custom_modules(workdir, tmp_path, monkeypatch):
    """The README's plain ``terratorch fit`` of the example config, through TerraTorch's CLI in process.

    The ``terratorch`` executable finding our backbones through ``custom_modules`` (its cold start included)
    is walked by tests/test_lifecycle_cli.py::test_qlora_granite_through_terratorch_and_export.
    """
    from terratorch.cli_tools import build_lightning_cli

    shutil.copytree(workdir / "data", tmp_path / "data")
    shutil.copytree(workdir / "examples", tmp_path / "examples")
    (tmp_path / "custom_modules").mkdir()
    (tmp_path / "custom_modules" / "__init__.py").write_text("import earthmind_compat\n")
    monkeypatch.chdir(tmp_path)
    cli = build_lightning_cli(["fit", "-c", "examples/segmentation.yaml", "--trainer.max_epochs", "1"])
    assert cli.trainer.current_epoch == 1
    assert list((tmp_path / "runs" / "segmentation" / "checkpoints").glob("*.ckpt"))
