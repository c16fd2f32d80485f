"""Golden features: each backbone, built from its committed tiny checkpoint, reproduces its stored features.

Fixed weights, fixed input, fixed outputs, in every matrix cell (``pytest -m "not gpu"``). The fixtures and the
tolerance are described in tests/golden/README.md; they are rewritten only by ``python -m tests.golden
regenerate``, never by a test.
"""

from __future__ import annotations

import json

import golden
import pytest
import torch
from golden import CASES, MANIFEST, REGENERATE, TOLERANCE, GoldenCase

pytestmark = pytest.mark.numerics

IDS = [item.name for item in CASES]


@pytest.mark.parametrize("item", CASES, ids=IDS)
def test_backbone_reproduces_its_golden_features(item: GoldenCase):
    rows = golden.compare(item)
    worst = max(row["scaled"] for row in rows)
    per_feature = [f"{row['scaled']:.2e}" for row in rows]
    assert worst <= TOLERANCE, (
        f"{item.name}: features differ from the stored ones by up to {worst:.3e} of their scale "
        f"(tolerance {TOLERANCE:.0e}); per feature: {per_feature}. An upstream "
        f"change, or ours, alters what this checkpoint produces. If the change is intended, regenerate with "
        f"`{REGENERATE} --case {item.name}` and say why in the commit."
    )


#: The first norm on the residual stream: InternViT's ``layernorm_before``, Granite's ``input_layernorm``.
FIRST_NORMS = ("layernorm_before", "input_layernorm")


def _first_norm(backbone: torch.nn.Module) -> tuple[str, torch.nn.Module, str]:
    """The first norm of the backbone's first block, and the name of its epsilon attribute."""
    for name, module in backbone.named_modules():
        if name.endswith(FIRST_NORMS):
            for attribute in ("eps", "variance_epsilon"):
                if isinstance(getattr(module, attribute, None), float):
                    return name, module, attribute
    raise AssertionError(f"{type(backbone).__name__} has no norm layer with an epsilon")


@pytest.mark.parametrize("item", CASES, ids=IDS)
def test_one_changed_norm_epsilon_exceeds_the_tolerance(item: GoldenCase):
    """The fixtures are sensitive enough: moving one norm's epsilon tenfold breaks the golden comparison."""
    expected, new = golden.load_expected(item)
    backbone = golden.build(item, new)
    name, norm, attribute = _first_norm(backbone)
    setattr(norm, attribute, getattr(norm, attribute) * 10)
    with torch.no_grad():
        features = backbone(golden.case_input(item))
    worst = max(golden.scaled_error(f.float(), e) for f, e in zip(features, expected, strict=True))
    assert worst > 10 * TOLERANCE, f"{item.name}: epsilon x10 in {name} moved the features by only {worst:.3e}"


def test_every_case_has_its_fixture_and_manifest_entry():
    manifest = json.loads(MANIFEST.read_text())
    assert manifest["command"] == REGENERATE
    assert sorted(manifest["cases"]) == sorted(IDS)
    for item in CASES:
        assert golden.features_path(item).is_file(), f"missing; run `{REGENERATE} --case {item.name}`"
        assert (golden.CHECKPOINTS / item.checkpoint / "config.json").is_file()
        recorded = manifest["cases"][item.name]["options"]
        assert json.dumps(recorded) == json.dumps(dict(item.options)), f"{item.name} was written with {recorded}"
    assert len(set(IDS)) == len(IDS)


def test_fixtures_stay_small():
    total = sum(path.stat().st_size for path in golden.ROOT.rglob("*.safetensors"))
    assert total < 512 * 1024, f"golden fixtures take {total / 1024:.0f} KiB; keep them well under 1 MB"


def test_golden_input_is_fixed_and_exact():
    x = golden.golden_input((3, 4, 5))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 5)
    assert torch.equal(x * 16, (x * 16).round())  # multiples of 1/16: exact in every dtype used
    assert x[0, 0, 0, :3].tolist() == [-0.5, -0.3125, -0.125]  # pinned values of the integer formula
    assert not torch.equal(golden.golden_input((3, 4, 5), salt=1), x)
