"""Small synthetic GeoTIFF datasets for examples and end-to-end tests (no download needed).

Each image is a multispectral raster with a real CRS and geotransform; its label marks "disturbed" pixels:
a few random blobs where the red band is brighter and the near-infrared band darker, the way cleared
forest looks against canopy. The task is learnable, so a short training run moves the loss.
"""

from __future__ import annotations

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
    import rasterio
    from rasterio.transform import from_origin

    root = Path(root)
    splits = splits or {"train": 8, "val": 4, "test": 4, "predict": 2}
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        if split != "predict":
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = _scene(rng, size)
            origin_x = 400000.0 + index * size * PIXEL_SIZE
            transform = from_origin(origin_x, 5500000.0, PIXEL_SIZE, PIXEL_SIZE)
            profile = {
                "driver": "GTiff",
                "width": size,
                "height": size,
                "crs": SYNTHETIC_CRS,
                "transform": transform,
            }
            stem = f"{split}_{index:03d}"
            with rasterio.open(
                root / split / "images" / f"{stem}_img.tif", "w", count=image.shape[0], dtype="float32", **profile
            ) as dst:
                dst.write(image)
                dst.descriptions = SYNTHETIC_BANDS
            if split != "predict":
                with rasterio.open(
                    root / split / "labels" / f"{stem}_mask.tif", "w", count=1, dtype="uint8", **profile
                ) as dst:
                    dst.write(mask[None])
    return root
