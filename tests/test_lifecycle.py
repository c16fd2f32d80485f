"""Layer 5: the whole TerraTorch lifecycle under every memory technique, in process.

``fit`` writes a real Lightning checkpoint; ``test`` and ``predict`` load it with ``ckpt_path`` into a freshly
built task (different random initialisation) and must compute exactly what the model in memory computed; a
second ``fit`` resumes from it. Every backbone x {none, int8, nf4+dq, qlora+ckpt} at the tiny preset, on one
shared synthetic GeoTIFF dataset, one training batch per epoch. The same journey through the real command lines is in
``tests/test_lifecycle_cli.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from terratorch_metrics import MIOU, metric

from earthmind_compat.backbones.state_match import CheckpointMismatchError
from earthmind_compat.recipes import recommend
from earthmind_compat.synthetic import DISTURBANCE_BANDS, DISTURBANCE_MEANS, DISTURBANCE_STDS, write_disturbance_dataset

BACKBONES = ("internvl2_5_4b", "granite_4_tiny", "earthmind_v1")
TECHNIQUES = ("none", "int8", "nf4+dq", "qlora+ckpt")
#: Five of the eight bi-temporal bands, as a user selects them with ``output_bands``.
BANDS = list(DISTURBANCE_BANDS[1:6])
TILE = 56


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle") / "forest"
    return write_disturbance_dataset(root, {"train": 2, "val": 2, "test": 2, "predict": 2}, size=TILE, seed=5)


def datamodule(root):
    from terratorch.datamodules import GenericNonGeoSegmentationDataModule

    index = [DISTURBANCE_BANDS.index(b) for b in BANDS]
    return GenericNonGeoSegmentationDataModule(
        batch_size=2,
        num_workers=0,
        num_classes=2,
        **{f"{split}_data_root": root / split / "images" for split in ("train", "val", "test", "predict")},
        **{f"{split}_label_data_root": root / split / "labels" for split in ("train", "val", "test")},
        img_grep="*_img.tif",
        label_grep="*_mask.tif",
        dataset_bands=list(DISTURBANCE_BANDS),
        output_bands=BANDS,
        means=[DISTURBANCE_MEANS[i] for i in index],
        stds=[DISTURBANCE_STDS[i] for i in index],
    )


def model_args(backbone: str, technique: str) -> dict:
    recipe = recommend(backbone, "UperNetDecoder", preset="tiny", in_chans=len(BANDS))
    return recipe.model_args(
        backbone,
        backbone_preset="tiny",
        backbone_bands=BANDS,
        backbone_technique=technique,
        decoder_channels=16,
        num_classes=2,
    )


def task(backbone: str, technique: str, seed: int):
    from terratorch.tasks import SemanticSegmentationTask

    torch.manual_seed(seed)
    return SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args=model_args(backbone, technique),
        loss="ce",
        ignore_index=-1,
        lr=1e-2,
    )


def trainer(root, epochs: int, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        **kwargs,
    )


def outputs(module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module.model(x).output


class BatchCounter(Callback):
    """Counts the training batches that one ``fit`` runs."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.count += 1


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|predict_dataloader|LightningCLI).*")
        yield


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_fit_test_predict_resume(backbone, technique, dataset, tmp_path, quiet, record_property):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = datamodule(dataset)
    fitted = task(backbone, technique, seed=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(tmp_path, epochs=1, callbacks=[checkpoints], limit_val_batches=1)
    first.fit(fitted, datamodule=data)
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint.is_file()
    x = torch.randn(2, len(BANDS), TILE, TILE, generator=torch.Generator().manual_seed(0))
    expected = outputs(fitted, x)

    # test from the checkpoint: a fresh task (other random init) must become the fitted model exactly
    evaluated = task(backbone, technique, seed=1)
    assert not torch.equal(outputs(evaluated, x), expected), "the fresh task must start elsewhere"
    metrics = trainer(tmp_path, epochs=1).test(evaluated, datamodule=data, ckpt_path=checkpoint)[0]
    difference = (outputs(evaluated, x) - expected).abs().max().item()
    record_property("max_abs_difference_after_reload", difference)  # --junitxml reports it per combination
    assert difference <= 1e-6, f"{backbone} {technique}: output differs by {difference} after reloading"
    # the reported loss is the reloaded model's: recompute it on the test split independently
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    batch = data.aug(batch) if hasattr(data, "aug") and data.aug is not None else batch
    with torch.no_grad():
        logits = outputs(evaluated, batch["image"])
    loss = torch.nn.functional.cross_entropy(logits, batch["mask"].long(), ignore_index=-1).item()
    assert metrics["test/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert 0.0 <= metric(metrics, *MIOU) <= 1.0

    # predict from the checkpoint: one class map per tile, on the tile's grid, from the fitted weights
    predicted = task(backbone, technique, seed=2)
    batches = trainer(tmp_path, epochs=1).predict(predicted, datamodule=data, ckpt_path=checkpoint)
    classes, names = batches[0]
    if isinstance(classes, tuple):  # TerraTorch 1.2 returns (classes, output name)
        classes = classes[0]
    assert classes.shape == (2, TILE, TILE) and set(classes.unique().tolist()) <= {0, 1}
    assert len(names) == 2
    assert torch.equal(outputs(predicted, x), expected)

    # resume: the epoch counter and optimizer state come back, and training goes on for the one epoch left
    # (a fit that ignored the checkpoint would also end at epoch 2, but after training two epochs here)
    resumed = task(backbone, technique, seed=3)
    batches = BatchCounter()
    second = trainer(tmp_path, epochs=2, limit_val_batches=1, callbacks=[batches])
    second.fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert second.current_epoch == 2 and second.global_step == 2 * first.global_step
    assert batches.count == first.global_step, f"{batches.count} batches trained after resuming"
    trained = [p for p in resumed.parameters() if p.requires_grad]
    assert trained, "a fine-tune must train something"
    assert not torch.equal(outputs(resumed, x), expected), "the resumed epoch must change the model"


@pytest.mark.e2e
def test_a_checkpoint_of_another_technique_names_both_sides(dataset, tmp_path, quiet):
    fitted = task("internvl2_5_4b", "nf4+dq", seed=0)
    path = tmp_path / "state.ckpt"
    torch.save({"state_dict": fitted.state_dict()}, path)
    other = task("internvl2_5_4b", "none", seed=0)
    with pytest.raises(CheckpointMismatchError, match=r"technique 'nf4\+dq'.*built with 'none'.*backbone_technique"):
        other.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
