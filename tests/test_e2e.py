"""Layer 5: the example configs run with ``terratorch fit``, ``test`` and ``predict`` as a user types them.

A working directory gets the examples, a ``custom_modules`` package that imports earthmind_compat (how a
plain ``terratorch`` run discovers our backbones and necks) and the synthetic bi-temporal GeoTIFF datasets;
then TerraTorch's CLI runs them on CPU at the tiny preset, in process (``build_lightning_cli``, what the
``terratorch`` executable runs; the executable itself, with its 15-20 s cold start, is exercised by
``tests/test_lifecycle_cli.py`` and ``tests/test_readme.py``). The fitted models must beat the best
constant prediction on the test split, and predictions must be GeoTIFFs on the input's grid: same CRS,
transform and size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from terratorch_metrics import ACCURACY, MIOU, metric
from upstream_bugs import TERRATORCH_PREDICT_NEEDS_CLASS_FOLDERS

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


def terratorch(*args: str):
    from terratorch.cli_tools import build_lightning_cli

    return build_lightning_cli(list(args))


def fit_test_predict(workdir: Path, config: str, run_dir: str, monkeypatch) -> tuple[dict, Path]:
    monkeypatch.chdir(workdir)
    terratorch("fit", "-c", config)
    checkpoints = sorted((workdir / "runs" / run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, f"terratorch fit -c {config} wrote no checkpoint"
    checkpoint = str(checkpoints[-1])
    tested = terratorch("test", "-c", config, "--ckpt_path", checkpoint)
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    out = workdir / f"predictions_{run_dir}"
    terratorch("predict", "-c", config, "--ckpt_path", checkpoint, "--predict_output_dir", str(out))
    return metrics, out


def assert_on_the_input_grid(prediction: Path, source: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(source) as src, rasterio.open(prediction) as pred:
        assert pred.crs is not None and pred.crs == src.crs
        assert pred.transform == src.transform
        assert (pred.width, pred.height) == (src.width, src.height)
        return pred.read(1)


def read_labels(paths) -> np.ndarray:
    import rasterio

    return np.concatenate([rasterio.open(p).read(1).ravel() for p in paths])


@pytest.mark.e2e
@pytest.mark.slow
def test_forest_disturbance_segmentation_fit_test_predict(workdir, monkeypatch):
    metrics, out = fit_test_predict(workdir, "forest_disturbance.yaml", "forest_disturbance", monkeypatch)
    # the best constant prediction (every pixel the most frequent class) scores frequency / 2 in mIoU
    labels = read_labels(sorted((workdir / "data" / "forest" / "test" / "labels").glob("*.tif")))
    constant = max(np.mean(labels == c) for c in (0, 1)) / 2
    assert metric(metrics, *MIOU) > constant + 0.1, (metrics, constant)
    assert np.isfinite(metric(metrics, "test/loss"))
    sources = sorted((workdir / "data" / "forest" / "predict" / "images").glob("*.tif"))
    predictions = sorted(out.glob("*.tif"))
    assert [p.name for p in predictions] == [s.stem + "_pred.tif" for s in sources]
    for prediction, source in zip(predictions, sources, strict=True):
        values = assert_on_the_input_grid(prediction, source)
        assert set(np.unique(values)) <= {0, 1}


@pytest.mark.e2e
@pytest.mark.slow
@TERRATORCH_PREDICT_NEEDS_CLASS_FOLDERS.mark
def test_disturbance_classification_fit_test_predict(workdir, monkeypatch):
    metrics, out = fit_test_predict(
        workdir, "disturbance_classification.yaml", "disturbance_classification", monkeypatch
    )
    test_tiles = workdir / "data" / "tiles" / "test"
    counts = [len(list((test_tiles / name).glob("*.tif"))) for name in DISTURBANCE_CLASSES]
    constant = max(counts) / sum(counts)  # accuracy of always answering the most frequent class
    assert metric(metrics, *ACCURACY) > constant, (metrics, constant)
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
