"""Small synthetic GeoTIFF datasets for examples and end-to-end tests (no download needed).

Each image is a multispectral raster with a real CRS and geotransform; its label marks "disturbed" pixels:
a few random blobs where the red band is brighter and the near-infrared band darker, the way cleared
forest looks against canopy. The task is learnable, so a short training run moves the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Band order of the synthetic images (names as TerraTorch's HLSBands spells them).
SYNTHETIC_BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW")
#: Per-band mean and standard deviation of the synthetic reflectance, for the datamodule's normalisation.
SYNTHETIC_MEANS = (0.05, 0.08, 0.06, 0.30)
SYNTHETIC_STDS = (0.02, 0.02, 0.05, 0.08)
#: UTM zone 33N, 10 m pixels: where and how big the synthetic scenes are.
SYNTHETIC_CRS = "EPSG:32633"
PIXEL_SIZE = 10.0


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 10, size / 4)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    image = np.empty((len(SYNTHETIC_BANDS), size, size), dtype=np.float32)
    for band, (mean, std) in enumerate(zip(SYNTHETIC_MEANS, SYNTHETIC_STDS, strict=True)):
        image[band] = rng.normal(mean, std / 3, (size, size))
    image[2] += 0.1 * mask  # red brighter where disturbed
    image[3] -= 0.15 * mask  # near-infrared darker where disturbed
    return image, mask


def write_segmentation_dataset(
    root: str | Path, splits: dict[str, int] | None = None, size: int = 56, seed: int = 0
) -> Path:
    """Write ``root/<split>/images/*_img.tif`` and ``root/<split>/labels/*_mask.tif``.

    Args:
        root: Output directory (created).
        splits: Number of scenes per split (default train 8, val 4, test 4, predict 2; predict has no labels).
        size: Side of each scene in pixels.
        seed: Random seed; the same seed writes identical files.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    return _write_segmentation_splits(root, splits, size, seed, _scene, SYNTHETIC_BANDS)


# -- forest disturbance: bi-temporal scenes ------------------------------------------------------------------
#
# Disturbance is a change, so the examples take two dates stacked as bands (before, then after). In a single
# after-image a new clearing looks like any bare ground that was already there (fields, roads, old cuts);
# only the before-image tells them apart. The synthetic scenes are built so that this matters: every scene
# has pre-existing bare patches (label 0) and new clearings (label 1) with the same after-date signature,
# and the two dates differ by a random per-scene illumination gain, as real acquisitions do.

#: Band names of the bi-temporal images: the four bands at the earlier date (T0), then at the later one (T1).
DISTURBANCE_BANDS = tuple(f"{band}_T{date}" for date in (0, 1) for band in SYNTHETIC_BANDS)
#: Per-band mean and standard deviation of the bi-temporal images (canopy dominates every scene).
DISTURBANCE_MEANS = SYNTHETIC_MEANS * 2
DISTURBANCE_STDS = SYNTHETIC_STDS * 2
#: Class folders of the classification dataset, in label order.
DISTURBANCE_CLASSES = ("intact", "disturbed")
_BARE_SHIFT = np.array([0.03, 0.04, 0.10, -0.15], dtype=np.float32)  # bare ground vs canopy, per band


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a scene given as one side or as ``(height, width)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _blobs(rng: np.random.Generator, size: int | tuple[int, int], count: int) -> np.ndarray:
    height, width = _shape(size)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(count):
        cy, cx = rng.uniform(0, (height, width))
        radius = rng.uniform(min(height, width) / 10, min(height, width) / 5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return mask


def disturbance_scene(
    rng: np.random.Generator, size: int | tuple[int, int], clearings: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One bi-temporal scene: an ``[8, H, W]`` float32 image and its ``[H, W]`` uint8 label.

    Args:
        rng: Random generator.
        size: Side in pixels, or ``(height, width)``.
        clearings: Number of new clearings (default: 1 to 3 at random); 0 gives an intact scene.

    Returns:
        ``(image, label)``; the label is 1 where forest was cleared between the two dates.
    """
    already_bare = _blobs(rng, size, int(rng.integers(1, 3)))
    count = int(rng.integers(1, 4)) if clearings is None else clearings
    cleared = _blobs(rng, size, count) & ~already_bare
    while count and not cleared.any():  # a clearing hidden under old bare ground would mislabel the tile
        cleared = _blobs(rng, size, count) & ~already_bare
    means = np.array(SYNTHETIC_MEANS, dtype=np.float32)[:, None, None]
    stds = np.array(SYNTHETIC_STDS, dtype=np.float32)[:, None, None] / 3
    dates = []
    for bare, gain in ((already_bare, 1.0), (already_bare | cleared, float(rng.uniform(0.85, 1.15)))):
        image = rng.normal(means, stds, (len(SYNTHETIC_BANDS), *_shape(size))).astype(np.float32)
        image += _BARE_SHIFT[:, None, None] * bare[None]
        dates.append(image * gain)
    return np.concatenate(dates), cleared.astype(np.uint8)


def _profile(size: int | tuple[int, int], index: int) -> dict:
    from rasterio.transform import from_origin

    height, width = _shape(size)
    origin_x = 400000.0 + index * width * PIXEL_SIZE
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "crs": SYNTHETIC_CRS,
        "transform": from_origin(origin_x, 5500000.0, PIXEL_SIZE, PIXEL_SIZE),
    }


def _write_image(path: Path, image: np.ndarray, profile: dict, bands: tuple[str, ...] = DISTURBANCE_BANDS) -> None:
    import rasterio

    with rasterio.open(path, "w", count=image.shape[0], dtype="float32", **profile) as dst:
        dst.write(image)
        dst.descriptions = bands


def _write_segmentation_splits(
    root: str | Path,
    splits: dict[str, int] | None,
    size: int | tuple[int, int],
    seed: int,
    make_scene: Callable[[np.random.Generator, int | tuple[int, int]], tuple[np.ndarray, np.ndarray]],
    bands: tuple[str, ...],
) -> Path:
    """Write ``root/<split>/images/<split>_<i>_img.tif`` and ``labels/<split>_<i>_mask.tif`` per split.

    ``make_scene(rng, size)`` returns ``(image [bands, size, size], mask [size, size])``; the ``predict``
    split gets images only. Default splits: train 8, val 4, test 4, predict 2.
    """
    import rasterio

    root = Path(root)
    splits = splits or {"train": 16, "val": 4, "test": 8, "predict": 2}
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        if split != "predict":
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = make_scene(rng, size)
            profile = _profile(size, index)
            stem = f"{split}_{index:03d}"
            _write_image(root / split / "images" / f"{stem}_img.tif", image, profile, bands)
            if split != "predict":
                with rasterio.open(
                    root / split / "labels" / f"{stem}_mask.tif", "w", count=1, dtype="uint8", **profile
                ) as dst:
                    dst.write(mask[None])
    return root


def write_disturbance_dataset(
    root: str | Path, splits: dict[str, int] | None = None, size: int | tuple[int, int] = 56, seed: int = 0
) -> Path:
    """Write a bi-temporal forest-disturbance segmentation dataset of GeoTIFFs.

    Layout: ``root/<split>/images/<split>_<i>_img.tif`` (8 bands, :data:`DISTURBANCE_BANDS`) and
    ``root/<split>/labels/<split>_<i>_mask.tif`` (1 = disturbed); ``predict`` has images only.

    Args:
        root: Output directory (created).
        splits: Scenes per split (default train 8, val 4, test 4, predict 2).
        size: Side of each scene in pixels, or ``(height, width)``.
        seed: Random seed; the same seed writes identical files.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    return _write_segmentation_splits(root, splits, size, seed, disturbance_scene, DISTURBANCE_BANDS)


def write_disturbance_classification_dataset(
    root: str | Path, splits: dict[str, int] | None = None, size: int = 56, seed: int = 0
) -> Path:
    """Write a bi-temporal tile classification dataset: was any forest cleared between the two dates?

    Layout (what TerraTorch's ``GenericNonGeoClassificationDataModule`` reads, one folder per class):
    ``root/<split>/intact/*.tif`` and ``root/<split>/disturbed/*.tif``; ``root/predict/*.tif`` unlabelled.
    Classes alternate, so every split holds both.

    Args:
        root: Output directory (created).
        splits: Tiles per split (default train 16, val 4, test 8, predict 2: with 8 training tiles the
            tiny Granite example beat a constant prediction for some initial weights only, and 4 test tiles
            measure accuracy in steps of 0.25).
        size: Side of each tile in pixels.
        seed: Random seed; the same seed writes identical files.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    splits = splits or {"train": 16, "val": 4, "test": 8, "predict": 2}
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        for index in range(count):
            label = index % len(DISTURBANCE_CLASSES)
            image, _ = disturbance_scene(rng, size, clearings=2 * label)
            folder = root / split if split == "predict" else root / split / DISTURBANCE_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            _write_image(folder / f"{split}_{index:03d}.tif", image, _profile(size, index))
    return root
