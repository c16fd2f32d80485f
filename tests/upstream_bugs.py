"""Known upstream bugs, one place: each is a strict expected failure on the versions it affects.

A test that fails only because of a bug in a dependency carries the mark below instead of being loosened or
skipped: ``xfail(strict=True)`` with the upstream reference and the affected versions. The matrix draws such a
cell blue ("upstream"), distinct from red ("ours"); when upstream fixes the bug the test passes, pytest fails
the strict XPASS and the cell turns red until the mark's version range is corrected. The README's
troubleshooting section lists the same bugs (``tests/test_matrix.py`` keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from packaging.version import Version

from earthmind_compat.compat import installed_version


@dataclass(frozen=True)
class UpstreamBug:
    """A bug in a dependency that makes one of our tests fail on some of its releases.

    Attributes:
        package: The distribution with the bug.
        affected: Human-readable release range, as the README lists it.
        low: Lowest affected release (inclusive).
        high: Highest affected release (inclusive): the first fixed one minus one, or the newest checked.
        reference: Upstream issue / pull request / source location that documents it.
        summary: What goes wrong, in one sentence.
    """

    package: str
    affected: str
    low: str
    high: str
    reference: str
    summary: str

    def applies(self) -> bool:
        """Whether the installed release of :attr:`package` is in the affected range."""
        found = installed_version(self.package)
        if found is None:
            return False
        release = Version(Version(found).base_version)
        return Version(self.low) <= release <= Version(self.high)

    @property
    def mark(self) -> pytest.MarkDecorator:
        """``xfail(strict=True)`` where the bug applies; the reason names the bug, versions and reference."""
        return pytest.mark.xfail(
            self.applies(),
            reason=f"upstream: {self.package} {self.affected}: {self.summary} ({self.reference})",
            strict=True,
        )


#: TerraTorch 1.0.x builds the classification predict dataset on torchvision's ImageFolder, which needs class
#: sub-folders; a flat folder of tiles fails with "Couldn't find any class folder". 1.1.0 passes require_label=False.
TERRATORCH_PREDICT_NEEDS_CLASS_FOLDERS = UpstreamBug(
    package="terratorch",
    affected=">= 1.0.0, < 1.1.0 (fixed in 1.1.0)",
    low="1.0.0",
    high="1.0.999",
    reference="https://github.com/torchgeo/terratorch/issues/756, fixed by PR #770",
    summary="classification `predict` on a folder of tiles without class sub-folders raises FileNotFoundError",
)

#: AggregateTokens returns the features of the selected layers only, but its process_channel_list returns the
#: whole input channel list, so a decoder after it is built for the wrong width when not every layer is selected.
TERRATORCH_AGGREGATE_TOKENS_CHANNELS = UpstreamBug(
    package="terratorch",
    affected=">= 1.1.0, <= 1.2.13 (every release with AggregateTokens checked; unfixed)",
    low="1.1.0",
    high="1.2.13",
    reference="terratorch/models/necks.py AggregateTokens.process_channel_list returns channel_list unchanged",
    summary="AggregateTokens.process_channel_list ignores index/indices",
)

#: TerraTorch 1.0.x's PixelWiseModel and ScalarOutputModel call the neck with the features only, so a neck cannot
#: know the image size: a token grid is placed only when it is square. TerraTorch pads to twice the patch size, so
#: 96 x 80 tiles reach a 14-pixel-patch backbone as 112 x 84 (8 x 6 patches). 1.1.0 passes ``image_size=``.
TERRATORCH_NECKS_GET_NO_IMAGE_SIZE = UpstreamBug(
    package="terratorch",
    affected=">= 1.0.0, < 1.1.0 (fixed in 1.1.0)",
    low="1.0.0",
    high="1.0.999",
    reference=(
        "terratorch/models/pixel_wise_model.py: 1.0.2 calls the neck as prepare(features), 1.1.0 as "
        "self.neck(features, image_size=input_size)"
    ),
    summary="necks get no image size, so tokens of a non-square patch grid cannot be placed on it",
)

#: Every known upstream bug (the README troubleshooting section lists each).
UPSTREAM_BUGS = (
    TERRATORCH_PREDICT_NEEDS_CLASS_FOLDERS,
    TERRATORCH_AGGREGATE_TOKENS_CHANNELS,
    TERRATORCH_NECKS_GET_NO_IMAGE_SIZE,
)
