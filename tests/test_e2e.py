"""Layer 5: the example configs run with ``terratorch fit``, ``test`` and ``predict`` as a user types them.

A working directory gets the examples, a ``custom_modules`` package that imports earthmind_compat (how a
plain ``terratorch`` run discovers our backbones and necks) and the synthetic bi-temporal GeoTIFF datasets;
then the real TerraTorch CLI runs in a subprocess on CPU at the tiny preset. Predictions must be GeoTIFFs
on the input's grid: same CRS, transform and size.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from earthmind_compat.recipes import recommend
from earthmind_compat.synthetic import (
    DISTURBANCE_BANDS,
    DISTURBANCE_CLASSES,
    disturbance_scene,
    write_disturbance_classification_dataset,
    write_disturbance_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TASKS = {
    "terratorch.tasks.SemanticSegmentationTask": "segmentation",
    "terratorch.tasks.ClassificationTask": "classification",
    "terratorch.tasks.PixelwiseRegressionTask": "regression",
}


def terratorch_cli() -> str:
    path = Path(sys.executable).parent / "terratorch"
    return str(path) if path.exists() else shutil.which("terratorch")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("e2e")
    for config in EXAMPLES.glob("*.yaml"):
        shutil.copy(config, directory / config.name)
    (directory / "custom_modules").mkdir()
    (directory / "custom_modules" / "__init__.py").write_text("import earthmind_compat\n")
    write_disturbance_dataset(directory / "data" / "forest")
    write_disturbance_classification_dataset(directory / "data" / "tiles")
    return directory


def terratorch(workdir: Path, *args: str) -> str:
    result = subprocess.run(
        [terratorch_cli(), *args], cwd=workdir, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def fit_test_predict(workdir: Path, config: str, run_dir: str) -> tuple[str, Path]:
    terratorch(workdir, "fit", "-c", config)
    checkpoints = sorted((workdir / "runs" / run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, f"terratorch fit -c {config} wrote no checkpoint"
    checkpoint = str(checkpoints[-1])
    tested = terratorch(workdir, "test", "-c", config, "--ckpt_path", checkpoint)
    out = workdir / f"predictions_{run_dir}"
    terratorch(workdir, "predict", "-c", config, "--ckpt_path", checkpoint, "--predict_output_dir", str(out))
    return tested, out


def assert_on_the_input_grid(prediction: Path, source: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(source) as src, rasterio.open(prediction) as pred:
        assert pred.crs is not None and pred.crs == src.crs
        assert pred.transform == src.transform
        assert (pred.width, pred.height) == (src.width, src.height)
        return pred.read(1)


def metric(output: str, *names: str) -> float:
    """The value of the first of ``names`` in Lightning's test table (TerraTorch renamed metrics in 1.1)."""
    for name in names:
        match = re.search(rf"{re.escape(name)}\s*│\s*([0-9.eE+-]+)", output)
        if match:
            return float(match.group(1))
    raise AssertionError(f"none of {names} in the test output")


@pytest.mark.e2e
@pytest.mark.slow
def test_forest_disturbance_segmentation_fit_test_predict(workdir):
    tested, out = fit_test_predict(workdir, "forest_disturbance.yaml", "forest_disturbance")
    assert 0.0 <= metric(tested, "test/mIoU", "test/Multiclass_Jaccard_Index") <= 1.0
    assert np.isfinite(metric(tested, "test/loss"))
    sources = sorted((workdir / "data" / "forest" / "predict" / "images").glob("*.tif"))
    predictions = sorted(out.glob("*.tif"))
    assert [p.name for p in predictions] == [s.stem + "_pred.tif" for s in sources]
    for prediction, source in zip(predictions, sources, strict=True):
        values = assert_on_the_input_grid(prediction, source)
        assert set(np.unique(values)) <= {0, 1}


@pytest.mark.e2e
@pytest.mark.slow
def test_disturbance_classification_fit_test_predict(workdir):
    tested, out = fit_test_predict(workdir, "disturbance_classification.yaml", "disturbance_classification")
    assert 0.0 <= metric(tested, "test/Accuracy", "test/Overall_Accuracy") <= 1.0
    sources = sorted((workdir / "data" / "tiles" / "predict").glob("*.tif"))
    predictions = sorted(out.glob("*.tif"))
    assert [p.name for p in predictions] == [s.stem + "_pred.tif" for s in sources]
    for prediction, source in zip(predictions, sources, strict=True):
        values = assert_on_the_input_grid(prediction, source)
        (label,) = np.unique(values)  # one class per tile, written over the tile's grid
        assert label in range(len(DISTURBANCE_CLASSES))


# -- the examples are the recommended chains; the data is what the examples say it is -----------------------


@pytest.mark.registry
@pytest.mark.parametrize("name", ["forest_disturbance.yaml", "disturbance_classification.yaml"])
def test_example_necks_are_the_recommended_chain(name):
    model = yaml.safe_load((EXAMPLES / name).read_text())["model"]
    args = model["init_args"]["model_args"]
    backbone_kwargs = {k.removeprefix("backbone_"): v for k, v in args.items() if k.startswith("backbone_")}
    recipe = recommend(args["backbone"], args["decoder"], TASKS[model["class_path"]], **backbone_kwargs)
    expected = recipe.model_args(args["backbone"])
    assert args["necks"] == expected["necks"]
    for key, value in expected.items():
        if key.startswith("decoder_") and key != "decoder_channels":  # the width is the example's choice
            assert args[key] == value


@pytest.mark.e2e
def test_the_datasets_are_georeferenced_and_reproducible(tmp_path):
    import rasterio

    first = write_disturbance_dataset(tmp_path / "a", {"train": 2}, size=32, seed=3)
    again = write_disturbance_dataset(tmp_path / "b", {"train": 2}, size=32, seed=3)
    for path in sorted((first / "train").rglob("*.tif")):
        twin = again / path.relative_to(first)
        assert path.read_bytes() == twin.read_bytes()
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 32633 and src.transform.a == 10.0
            if "images" in path.parts:
                assert src.count == len(DISTURBANCE_BANDS) and tuple(src.descriptions) == DISTURBANCE_BANDS
    tiles = write_disturbance_classification_dataset(tmp_path / "tiles", {"train": 4}, size=32)
    assert sorted(p.name for p in (tiles / "train").iterdir()) == sorted(DISTURBANCE_CLASSES)


def ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    return (nir - red) / (nir + red)


@pytest.mark.e2e
def test_disturbance_needs_both_dates():
    """Why the examples are bi-temporal: the after-image alone cannot separate new clearings from old bare ground."""
    rng = np.random.default_rng(0)
    right, pixels, new_among_bare, bare_pixels = 0, 0, 0, 0
    for _ in range(20):
        image, label = disturbance_scene(rng, 48)
        band = DISTURBANCE_BANDS.index
        bare_before = ndvi(image[band("RED_T0")], image[band("NIR_NARROW_T0")]) < 0.35
        bare_after = ndvi(image[band("RED_T1")], image[band("NIR_NARROW_T1")]) < 0.35
        # Best a single date can do: call every bare pixel disturbed; most are not.
        bare_pixels += bare_after.sum()
        new_among_bare += (bare_after & (label == 1)).sum()
        # With both dates: bare now, vegetated before.
        right += ((bare_after & ~bare_before) == (label == 1)).sum()
        pixels += label.size
    assert new_among_bare / bare_pixels < 0.75, "old bare ground must be common among bare pixels"
    assert right / pixels > 0.99, "the before-image must tell them apart"
