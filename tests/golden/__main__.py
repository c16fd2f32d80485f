"""Regenerate or check the golden fixtures (never run by the tests).

From the repository root::

    python -m tests.golden regenerate                 # every checkpoint and every case, then the manifest
    python -m tests.golden regenerate --case NAME     # one case's features (its checkpoint only if missing)
    python -m tests.golden compare [--json FILE]      # this environment against the stored features

``compare`` prints, per case, the largest deviations from the stored features (scale-relative, absolute,
element-relative); it is how the spread across environments in tests/golden/README.md was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
from importlib import metadata

import torch

from . import CASES, CHECKPOINTS, FEATURES, MANIFEST, TOLERANCE, GoldenCase, build, case, compare, features_path, run
from .checkpoints import SEED, WRITERS

_PACKAGES = ("torch", "transformers", "terratorch", "safetensors", "numpy")


def versions() -> dict[str, str]:
    """Python and the versions of the packages that shape the features."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _write_checkpoint(name: str) -> None:
    directory = CHECKPOINTS / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    WRITERS[name](directory)
    for stray in directory.glob("generation_config.json"):  # not read by any backbone
        stray.unlink()


def _write_features(item: GoldenCase) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    backbone = build(item)
    new = {  # bf16 like the checkpoints: half the bytes, and loading upcasts them exactly
        f"{module}.{key}": value.detach().to(torch.bfloat16).contiguous()
        for module in getattr(type(backbone), "new_modules", ())
        for key, value in getattr(backbone, module).state_dict().items()
    }
    features = run(item, new)  # the tests' path: rebuilt, new modules loaded from the stored tensors
    tensors = {f"feature.{i}": f.contiguous() for i, f in enumerate(features)}
    tensors.update({f"new.{k}": v for k, v in new.items()})
    FEATURES.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(features_path(item)), metadata={"case": item.name})


def regenerate(names: list[str]) -> None:
    """Write the checkpoints (all, or the missing ones of the named cases), the features and the manifest."""
    items = [case(n) for n in names] if names else list(CASES)
    for checkpoint in sorted({item.checkpoint for item in items}):
        if not names or not (CHECKPOINTS / checkpoint / "config.json").is_file():
            print(f"checkpoint {checkpoint}")
            _write_checkpoint(checkpoint)
    for item in items:
        print(f"features   {item.name}")
        _write_features(item)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() and names else {}
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "versions": versions()}
    manifest["command"] = "python -m tests.golden regenerate"
    manifest["seed"] = SEED
    manifest.setdefault("checkpoints", {})
    for checkpoint in {item.checkpoint for item in items}:
        if not names or checkpoint not in manifest["checkpoints"]:
            manifest["checkpoints"][checkpoint] = stamp
    manifest.setdefault("cases", {})
    for item in items:
        manifest["cases"][item.name] = {
            **stamp,
            "backbone": item.backbone,
            "checkpoint": item.checkpoint,
            "options": dict(item.options),
        }
    known = {c.name for c in CASES}
    manifest["cases"] = {k: v for k, v in sorted(manifest["cases"].items()) if k in known}
    manifest["checkpoints"] = dict(sorted(manifest["checkpoints"].items()))
    # not sort_keys: the options keep their order (EarthMind's main modality comes first)
    MANIFEST.write_text(json.dumps({k: manifest[k] for k in sorted(manifest)}, indent=2) + "\n")
    total = sum(p.stat().st_size for p in (CHECKPOINTS.rglob("*"), FEATURES.rglob("*")) for p in p if p.is_file())
    print(f"wrote {MANIFEST.relative_to(MANIFEST.parents[2])}; fixtures total {total / 1024:.0f} KiB")


def compare_all(names: list[str], output: str | None) -> int:
    """Compare every (or the named) case in this environment; return 1 if any exceeds the tolerance."""
    report = {"versions": versions(), "tolerance": TOLERANCE, "cases": {}}
    worst_failed = False
    print(f"{'case':32} {'scaled':>10} {'max abs':>10} {'max rel':>10}")
    for item in [case(n) for n in names] if names else CASES:
        rows = compare(item)
        report["cases"][item.name] = rows
        worst = {key: max(row[key] for row in rows) for key in ("scaled", "max_abs", "max_rel")}
        failed = not worst["scaled"] <= TOLERANCE
        worst_failed |= failed
        print(
            f"{item.name:32} {worst['scaled']:10.3e} {worst['max_abs']:10.3e} {worst['max_rel']:10.3e}"
            f"{'  FAIL' if failed else ''}"
        )
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=lambda x: None if math.isinf(x) else x)
    return 1 if worst_failed else 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    regen = sub.add_parser("regenerate", help="write the golden checkpoints, features and manifest")
    regen.add_argument("--case", action="append", default=[], help="only this case (repeatable)")
    check = sub.add_parser("compare", help="compare this environment with the stored features")
    check.add_argument("--case", action="append", default=[], help="only this case (repeatable)")
    check.add_argument("--json", help="also write the deviations as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.command == "regenerate":
        regenerate(args.case)
        return 0
    return compare_all(args.case, args.json)


if __name__ == "__main__":
    sys.exit(main())
