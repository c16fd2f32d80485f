"""Layer 5: the lifecycle through the real command lines, as a user types it.

One working directory holds a ``custom_modules`` package (how a plain ``terratorch`` run finds our backbones),
a synthetic GeoTIFF dataset of 96 x 80 px tiles of which the configs select five bands, and one YAML per run.
Per technique at least one backbone walks ``fit`` -> ``test`` -> ``predict`` -> resumed ``fit`` from the
checkpoint file:

- ``qlora+ckpt`` (Granite, UNetDecoder: the journey that used to break at ``test``) through the
  ``terratorch`` executable in a subprocess for ``fit`` (one cold start: a plain ``terratorch`` finds our
  backbones through ``custom_modules``), then ``predict``, ``test``, the resumed ``fit`` and
  ``earthmind-compat export-adapters`` in process;
- ``none`` and ``nf4+dq`` (InternVL) through ``earthmind-compat fit/test/predict`` in process;
- ``int8`` (EarthMind) through TerraTorch's CLI in process (``build_lightning_cli``, what ``terratorch`` runs);
- ``bf16-mixed`` precision on a bf16 checkpoint (InternVL);
- ``activation_checkpointing: {every: 2}`` with ``lora: true`` (Granite) through TerraTorch's CLI in process.

In-process runs go through the same argument parsing, config and checkpoint code as the executables; only
the interpreter start (15-20 s each here) is saved. Predictions must be GeoTIFFs on each input's grid.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from terratorch_metrics import MIOU
from upstream_bugs import TERRATORCH_NECKS_GET_NO_IMAGE_SIZE

from earthmind_compat.cli import main as earthmind_compat
from earthmind_compat.recipes import recommend
from earthmind_compat.synthetic import DISTURBANCE_BANDS, DISTURBANCE_MEANS, DISTURBANCE_STDS, write_disturbance_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BANDS = list(DISTURBANCE_BANDS[1:6])
HEIGHT, WIDTH = 96, 80


def config(name: str, backbone: str, technique: str, decoder: str = "UperNetDecoder", **extra_backbone) -> dict:
    """A TerraTorch YAML as a user writes it, with the recommended necks."""
    index = [DISTURBANCE_BANDS.index(b) for b in BANDS]
    recipe = recommend(backbone, decoder, preset="tiny", in_chans=len(BANDS))
    decoder_channels = [16, 8, 4, 2] if decoder == "UNetDecoder" else 16
    model_args = recipe.model_args(
        backbone,
        backbone_preset="tiny",
        backbone_bands=BANDS,
        backbone_technique=technique,
        **{f"backbone_{k}": v for k, v in extra_backbone.items()},
        decoder_channels=decoder_channels,
        num_classes=2,
    )
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": f"runs/{name}",
        },
        "data": {
            "class_path": "terratorch.datamodules.GenericNonGeoSegmentationDataModule",
            "init_args": {
                "batch_size": 2,
                "num_workers": 0,
                "num_classes": 2,
                **{f"{s}_data_root": f"data/{s}/images" for s in ("train", "val", "test", "predict")},
                **{f"{s}_label_data_root": f"data/{s}/labels" for s in ("train", "val", "test")},
                "img_grep": "*_img.tif",
                "label_grep": "*_mask.tif",
                "dataset_bands": list(DISTURBANCE_BANDS),
                "output_bands": BANDS,
                "means": [DISTURBANCE_MEANS[i] for i in index],
                "stds": [DISTURBANCE_STDS[i] for i in index],
            },
        },
        "model": {
            "class_path": "terratorch.tasks.SemanticSegmentationTask",
            "init_args": {
                "model_factory": "EncoderDecoderFactory",
                "model_args": model_args,
                "loss": "ce",
                "ignore_index": -1,
                "freeze_backbone": False,
            },
        },
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-2}},
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lifecycle_cli")
    (directory / "custom_modules").mkdir()
    (directory / "custom_modules" / "__init__.py").write_text("import earthmind_compat\n")
    write_disturbance_dataset(
        directory / "data", {"train": 2, "val": 2, "test": 2, "predict": 2}, size=(HEIGHT, WIDTH), seed=9
    )
    return directory


def write_config(workdir: Path, name: str, document: dict) -> str:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path.name


def only_checkpoint(workdir: Path, name: str) -> str:
    checkpoints = sorted((workdir / "runs" / name / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1, f"fit of {name} wrote {checkpoints}"
    return str(checkpoints[0])


def terratorch_executable(workdir: Path, *args: str) -> str:
    executable = Path(sys.executable).parent / "terratorch"
    command = [str(executable) if executable.exists() else shutil.which("terratorch"), *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def terratorch_in_process(*args: str):
    from terratorch.cli_tools import build_lightning_cli

    return build_lightning_cli(list(args))


def assert_predictions_on_the_input_grid(workdir: Path, out: Path) -> None:
    import rasterio

    sources = sorted((workdir / "data" / "predict" / "images").glob("*.tif"))
    predictions = sorted(out.glob("*.tif"))
    assert [p.name for p in predictions] == [s.stem + "_pred.tif" for s in sources]
    for prediction, source in zip(predictions, sources, strict=True):
        with rasterio.open(source) as src, rasterio.open(prediction) as pred:
            assert pred.crs is not None and pred.crs == src.crs
            assert pred.transform == src.transform
            assert (pred.height, pred.width) == (src.height, src.width) == (HEIGHT, WIDTH)
            assert set(pred.read(1).ravel().tolist()) <= {0, 1}


def printed_metric(output: str, *names: str) -> float:
    """The first of ``names`` in the metrics table that ``test`` prints."""
    for name in names:
        match = re.search(rf"{re.escape(name)}\s*│\s*([0-9.eE+-]+)", output)
        if match:
            return float(match.group(1))
    raise AssertionError(f"none of {names} in the output")


def task_outputs(task, x: torch.Tensor) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        return task.model(x).output


def probe_input() -> torch.Tensor:
    return torch.randn(1, len(BANDS), HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


def test_qlora_granite_through_terratorch_and_export(workdir, monkeypatch):
    from earthmind_compat.optimize import load_adapters

    monkeypatch.chdir(workdir)
    name = write_config(
        workdir, "granite_qlora", config("granite_qlora", "granite_4_tiny", "qlora+ckpt", "UNetDecoder")
    )
    terratorch_executable(workdir, "fit", "-c", name)  # the cold start: plain terratorch + custom_modules
    checkpoint = only_checkpoint(workdir, "granite_qlora")
    out = workdir / "predictions_granite"
    terratorch_in_process("predict", "-c", name, "--ckpt_path", checkpoint, "--predict_output_dir", str(out))
    assert_predictions_on_the_input_grid(workdir, out)

    tested = terratorch_in_process("test", "-c", name, "--ckpt_path", checkpoint)
    assert torch.isfinite(tested.trainer.callback_metrics["test/loss"])
    expected = task_outputs(tested.model, probe_input())

    resumed = terratorch_in_process("fit", "-c", name, "--ckpt_path", checkpoint, "--trainer.max_epochs", "2")
    assert resumed.trainer.current_epoch == 2
    assert not torch.equal(task_outputs(resumed.model, probe_input()), expected), "training must go on"

    adapters = workdir / "export" / "granite_qlora.safetensors"
    code = earthmind_compat(["export-adapters", "-c", name, "--ckpt_path", checkpoint, "--output", str(adapters)])
    assert code == 0 and adapters.is_file()
    assert adapters.stat().st_size < Path(checkpoint).stat().st_size
    # the adapters on a freshly built task give the fit back. Its base is the same random draw as at fit time
    # (seed_everything: 0 in the config) because this tiny config has no backbone_weights, which in real use
    # supply the base; everything the export holds starts at its initial values
    fresh = terratorch_in_process_model(name)
    assert not torch.equal(task_outputs(fresh, probe_input()), expected)
    load_adapters(fresh, adapters)
    assert torch.equal(task_outputs(fresh, probe_input()), expected)


def test_checkpointing_every_second_block_from_the_yaml(workdir, monkeypatch):
    """``backbone_activation_checkpointing: {every: 2}`` as a user writes it (with ``backbone_lora: true``): fit,
    test from the checkpoint file (the granularity rebuilt from the saved config, the outputs reloaded), resume."""
    from earthmind_compat.optimize.checkpointing import checkpointed_blocks

    monkeypatch.chdir(workdir)
    document = config("granite_every", "granite_4_tiny", "lora")
    model_args = document["model"]["init_args"]["model_args"]
    del model_args["backbone_technique"]
    model_args.update(backbone_lora=True, backbone_activation_checkpointing={"every": 2})
    name = write_config(workdir, "granite_every", document)
    fitted = terratorch_in_process("fit", "-c", name)
    assert checkpointed_blocks(fitted.model.model.encoder) == [0, 2]  # of the tiny preset's 4 blocks
    checkpoint = only_checkpoint(workdir, "granite_every")
    expected = task_outputs(fitted.model, probe_input())
    tested = terratorch_in_process("test", "-c", name, "--ckpt_path", checkpoint)
    assert checkpointed_blocks(tested.model.model.encoder) == [0, 2]
    assert torch.equal(task_outputs(tested.model, probe_input()), expected)
    resumed = terratorch_in_process("fit", "-c", name, "--ckpt_path", checkpoint, "--trainer.max_epochs", "2")
    assert resumed.trainer.current_epoch == 2
    assert checkpointed_blocks(resumed.model.model.encoder) == [0, 2]


def terratorch_in_process_model(name: str):
    from terratorch.cli_tools import build_lightning_cli

    return build_lightning_cli(["--config", name], run=False).model


@TERRATORCH_NECKS_GET_NO_IMAGE_SIZE.mark  # 96 x 80 tiles: 8 x 6 patches of 14 px after padding
@pytest.mark.parametrize("technique", ["none", "nf4+dq"])
def test_internvl_through_earthmind_compat(technique, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    run = f"internvl_{technique.replace('+', '_')}"
    name = write_config(workdir, run, config(run, "internvl2_5_4b", technique))
    assert earthmind_compat(["fit", "-c", name]) == 0
    checkpoint = only_checkpoint(workdir, run)
    capsys.readouterr()
    assert earthmind_compat(["test", "-c", name, "--ckpt_path", checkpoint]) == 0
    printed = capsys.readouterr().out
    assert 0.0 <= printed_metric(printed, *MIOU) <= 1.0
    out = workdir / f"predictions_{run}"
    assert earthmind_compat(["predict", "-c", name, "--ckpt_path", checkpoint, "--predict_output_dir", str(out)]) == 0
    assert_predictions_on_the_input_grid(workdir, out)
    assert earthmind_compat(["fit", "-c", name, "--ckpt_path", checkpoint, "--trainer.max_epochs", "2"]) == 0


@TERRATORCH_NECKS_GET_NO_IMAGE_SIZE.mark  # 96 x 80 tiles: 8 x 6 patches of 14 px after padding
def test_int8_earthmind_through_terratorch_cli(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    name = write_config(workdir, "earthmind_int8", config("earthmind_int8", "earthmind_v1", "int8"))
    fitted = terratorch_in_process("fit", "-c", name)
    checkpoint = only_checkpoint(workdir, "earthmind_int8")
    expected = task_outputs(fitted.model, probe_input())
    tested = terratorch_in_process("test", "-c", name, "--ckpt_path", checkpoint)
    assert torch.equal(task_outputs(tested.model, probe_input()), expected)
    out = workdir / "predictions_earthmind_int8"
    terratorch_in_process("predict", "-c", name, "--ckpt_path", checkpoint, "--predict_output_dir", str(out))
    assert_predictions_on_the_input_grid(workdir, out)
    resumed = terratorch_in_process("fit", "-c", name, "--ckpt_path", checkpoint, "--trainer.max_epochs", "2")
    assert resumed.trainer.current_epoch == 2


@TERRATORCH_NECKS_GET_NO_IMAGE_SIZE.mark  # 96 x 80 tiles: 8 x 6 patches of 14 px after padding
def test_bf16_mixed_precision_on_a_bf16_checkpoint(workdir, monkeypatch):
    from transformers import InternVLVisionModel

    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    monkeypatch.chdir(workdir)
    torch.manual_seed(0)
    weights = workdir / "internvl_bf16"
    model = InternVLVisionModel(vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None)).to(torch.bfloat16)
    model.save_pretrained(weights)
    document = config("internvl_bf16", "internvl2_5_4b", "none", weights=str(weights))
    document["trainer"]["precision"] = "bf16-mixed"
    name = write_config(workdir, "internvl_bf16", document)
    fitted = terratorch_in_process("fit", "-c", name)
    assert fitted.trainer.precision == "bf16-mixed"
    assert {p.dtype for p in fitted.model.model.encoder.parameters()} == {torch.float32}
    tested = terratorch_in_process("test", "-c", name, "--ckpt_path", only_checkpoint(workdir, "internvl_bf16"))
    assert torch.isfinite(tested.trainer.callback_metrics["test/loss"])
