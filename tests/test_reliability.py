"""Layer 6: a catalogue of bad inputs, hostile checkpoints, no network, determinism.

Every case must raise our own exception type (never a KeyError, never a deep stack trace from a
dependency) with a message that names the problem and says what to do.
"""

from __future__ import annotations

import json
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from terratorch.registry import BACKBONE_REGISTRY

import earthmind_compat
from earthmind_compat.cli import main as cli_main
from earthmind_compat.compat import (
    UntestedVersionWarning,
    call_with_hidden_states,
    untested_versions,
    warn_if_untested,
)
from earthmind_compat.errors import (
    ConfigurationError,
    EarthMindCompatError,
    InputError,
    RegistryConflictError,
    UnknownNameError,
    UnsafeCheckpointError,
    WeightsError,
)

pytestmark = pytest.mark.reliability


def internvl(**kwargs):
    return BACKBONE_REGISTRY.build("internvl2_5_4b", **{"preset": "tiny", **kwargs})


def granite(**kwargs):
    return BACKBONE_REGISTRY.build("granite_4_tiny", **{"preset": "tiny", **kwargs})


@pytest.fixture(scope="module")
def tiny_internvl():
    return internvl(in_chans=4).eval()


@pytest.fixture(scope="module")
def tiny_granite():
    return granite(in_chans=4).eval()


@dataclass
class Case:
    """One bad input: what to do, what must be raised, and words the message must contain."""

    id: str
    action: Callable[[dict], object]
    error: type[Exception]
    says: str


def _forward(model_name: str, make_input: Callable[[], object]) -> Callable[[dict], object]:
    return lambda env: env[model_name](make_input())


# -- forward inputs ----------------------------------------------------------------------------------------
INPUT_CASES = [
    Case("numpy-array", _forward("internvl", lambda: torch.randn(1, 4, 56, 56).numpy()), InputError, "torch.Tensor"),
    Case("list-input", _forward("granite", lambda: [[1.0]]), InputError, "torch.Tensor"),
    Case("2d-tensor", _forward("internvl", lambda: torch.randn(56, 56)), InputError, "4-D tensor"),
    Case("3d-tensor", _forward("internvl", lambda: torch.randn(4, 56, 56)), InputError, "4-D tensor"),
    Case("5d-time-series", _forward("granite", lambda: torch.randn(1, 4, 2, 64, 64)), InputError, "fold time"),
    Case("empty-batch", _forward("internvl", lambda: torch.randn(0, 4, 56, 56)), InputError, "at least one image"),
    Case("too-many-bands", _forward("internvl", lambda: torch.randn(1, 6, 56, 56)), InputError, "in_chans=6"),
    Case("too-few-bands", _forward("granite", lambda: torch.randn(1, 3, 64, 64)), InputError, "in_chans=3"),
    Case("height-off-grid", _forward("internvl", lambda: torch.randn(1, 4, 50, 56)), InputError, "multiple of 14"),
    Case("width-off-grid", _forward("granite", lambda: torch.randn(1, 4, 64, 70)), InputError, "multiple of 16"),
    Case("smaller-than-patch", _forward("internvl", lambda: torch.randn(1, 4, 8, 8)), InputError, "Resize or pad"),
    Case("nan-pixels", _forward("internvl", lambda: torch.full((1, 4, 56, 56), float("nan"))), InputError, "no-data"),
    Case("inf-pixels", _forward("granite", lambda: torch.full((1, 4, 64, 64), float("inf"))), InputError, "no-data"),
    Case(
        "integer-reflectance",
        _forward("internvl", lambda: torch.randint(0, 10000, (1, 4, 56, 56), dtype=torch.int32)),
        InputError,
        "normalise",
    ),
    Case(
        "bool-mask-as-image",
        _forward("granite", lambda: torch.ones(1, 4, 64, 64, dtype=torch.bool)),
        InputError,
        "float",
    ),
    Case(
        "wrong-device", _forward("internvl", lambda: torch.randn(1, 4, 56, 56, device="meta")), InputError, "move one"
    ),
    Case(
        "projector-odd-grid",
        lambda env: internvl(with_projector=True)(torch.randn(1, 3, 42, 42)),
        InputError,
        "multiples of 28",
    ),
]

# -- constructor arguments -----------------------------------------------------------------------------------
BUILD_CASES = [
    Case("bands-disagree", lambda env: internvl(in_chans=4, bands=["RED", "GREEN"]), ConfigurationError, "agree"),
    Case("zero-bands", lambda env: granite(in_chans=0), ConfigurationError, "positive integer"),
    Case("negative-bands", lambda env: internvl(in_chans=-3), ConfigurationError, "positive integer"),
    Case("float-in-chans", lambda env: internvl(in_chans=3.0), ConfigurationError, "positive integer"),
    Case("bool-in-chans", lambda env: granite(in_chans=True), ConfigurationError, "positive integer"),
    Case("bands-as-string", lambda env: internvl(bands="RED"), ConfigurationError, "['RED']"),
    Case("empty-bands", lambda env: granite(bands=[]), ConfigurationError, "at least one band"),
    Case("duplicate-bands", lambda env: internvl(bands=["RED", "RED"]), ConfigurationError, "once"),
    Case("non-string-band", lambda env: internvl(bands=["RED", 7]), ConfigurationError, "strings"),
    Case("unknown-preset", lambda env: internvl(preset="tinyy"), UnknownNameError, "Did you mean 'tiny'"),
    Case("unknown-preset-granite", lambda env: granite(preset="ful"), UnknownNameError, "Did you mean 'full'"),
    Case("out-index-too-big", lambda env: internvl(out_indices=[4]), ConfigurationError, "0..3"),
    Case("out-index-too-small", lambda env: granite(out_indices=[-5]), ConfigurationError, "negative indices"),
    Case("out-index-repeated", lambda env: internvl(out_indices=[1, -3]), ConfigurationError, "twice"),
    Case("out-indices-empty", lambda env: granite(out_indices=[]), ConfigurationError, "at least one"),
    Case("out-index-string", lambda env: internvl(out_indices=["3"]), ConfigurationError, "integers"),
    Case("kwarg-typo", lambda env: granite(outindices=[1]), ConfigurationError, "Did you mean 'out_indices'"),
    Case("kwarg-typo-internvl", lambda env: internvl(keep_cls=False), ConfigurationError, "keep_cls_token"),
    Case(
        "unknown-backbone-python",
        lambda env: earthmind_compat.build_backbone("granite4_tiny"),
        UnknownNameError,
        "Did you mean 'granite_4_tiny'",
    ),
]


# -- weights and checkpoints -----------------------------------------------------------------------------
def _write(directory: Path, name: str, content: bytes | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _copy_checkpoint(env: dict, fixture: str, target: str) -> Path:
    import shutil

    source, _ = env[fixture]
    destination = env["tmp"] / target
    shutil.copytree(source, destination)
    return destination


def _truncated(env: dict) -> Path:
    directory = _copy_checkpoint(env, "internvl_dir", "truncated")
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return directory


def _corrupt_header(env: dict) -> Path:
    directory = _copy_checkpoint(env, "internvl_dir", "corrupt")
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    return directory


def _edited_checkpoint(env: dict, name: str, edit: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    directory = _copy_checkpoint(env, "internvl_dir", name)
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return directory


class _Exploit:
    """Pickling this object makes unpickling call ``Path.touch`` on a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(env: dict) -> Path:
    directory = env["tmp"] / "pickle_only"
    _write(directory, "config.json", json.dumps({"model_type": "internvl_vision"}))
    _write(directory, "pytorch_model.bin", pickle.dumps({"weights": _Exploit(env["marker"])}))
    return directory


def _remote_code(env: dict) -> Path:
    # a remote-code model that is not one of the InternVL-family layouts read as data
    config = {"model_type": "qwen2_vl_chat", "auto_map": {"AutoModel": "modeling_qwen2_vl_chat.Model"}}
    directory = env["tmp"] / "remote_code"
    _write(directory, "config.json", json.dumps(config))
    return directory


WEIGHT_CASES = [
    Case(
        "weights-dir-missing",
        lambda env: internvl(weights=str(env["tmp"] / "nope")),
        WeightsError,
        "existing directory",
    ),
    Case(
        "weights-is-a-file",
        lambda env: internvl(weights=str(_write(env["tmp"] / "f", "model.safetensors", b"x"))),
        WeightsError,
        "pass the directory",
    ),
    Case(
        "hub-id-offline", lambda env: internvl(weights="someone/not-cached"), WeightsError, "huggingface-cli download"
    ),
    Case("pretrained-offline", lambda env: granite(pretrained=True), WeightsError, "pass the local directory"),
    Case(
        "no-config-json",
        lambda env: internvl(weights=str(_write(env["tmp"] / "noconf", "model.safetensors", b"x").parent)),
        WeightsError,
        "save_pretrained",
    ),
    Case(
        "config-not-json",
        lambda env: internvl(weights=str(_write(env["tmp"] / "badjson", "config.json", "{oops").parent)),
        WeightsError,
        "not valid JSON",
    ),
    Case("needs-remote-code", lambda env: internvl(weights=str(_remote_code(env))), UnsafeCheckpointError, "-hf"),
    Case("pickle-only", lambda env: internvl(weights=str(_pickle_only(env))), UnsafeCheckpointError, "safetensors"),
    Case(
        "pickle-opt-in-still-weights-only",
        lambda env: internvl(weights=str(_pickle_only(env)), allow_pickle=True),
        UnsafeCheckpointError,
        "weights_only",
    ),
    Case("truncated-safetensors", lambda env: internvl(weights=str(_truncated(env))), WeightsError, "save it again"),
    Case("corrupt-header", lambda env: internvl(weights=str(_corrupt_header(env))), WeightsError, "save it again"),
    Case(
        "wrong-model-type",
        lambda env: internvl(weights=str(env["granite_dir"][0])),
        WeightsError,
        "expected an InternVL-family checkpoint",
    ),
    Case(
        "granite-given-internvl",
        lambda env: granite(weights=str(env["internvl_dir"][0])),
        WeightsError,
        "expected 'granitemoehybrid'",
    ),
    Case(
        "checkpoint-missing-key",
        lambda env: internvl(
            weights=str(_edited_checkpoint(env, "missing", lambda s: s.pop("encoder.layer.0.lambda_1")))
        ),
        WeightsError,
        "missing ['vision_tower.encoder.layer.0.lambda_1']",
    ),
    Case(
        "checkpoint-extra-key",
        lambda env: internvl(
            weights=str(_edited_checkpoint(env, "extra", lambda s: s.update({"encoder.layer.9.bias": torch.ones(1)})))
        ),
        WeightsError,
        "unexpected ['encoder.layer.9.bias']",
    ),
    Case(
        "checkpoint-wrong-shape",
        lambda env: internvl(
            weights=str(
                _edited_checkpoint(env, "shape", lambda s: s.update({"encoder.layer.0.lambda_1": torch.ones(7)}))
            )
        ),
        WeightsError,
        "encoder.layer.0.lambda_1 -> vision_tower.encoder.layer.0.lambda_1: (7,) vs (32,)",
    ),
]


# -- memory techniques -----------------------------------------------------------------------------------
def _lora_twice(env: dict) -> None:
    from earthmind_compat.optimize import apply

    apply(internvl(lora=True), "lora")


def _quantize_on_meta(env: dict) -> None:
    from earthmind_compat.optimize import quantize_linears
    from earthmind_compat.optimize.plan import build_on_meta

    quantize_linears(build_on_meta("internvl2_5_4b", "tiny"), "nf4")


def _experts_from_a_dense_layer(env: dict) -> None:
    from earthmind_compat.optimize import QuantizedExperts

    QuantizedExperts(torch.nn.Linear(4, 4), "nf4")


TECHNIQUE_CASES = [
    Case("unknown-quantization", lambda env: internvl(quantization="nf5"), UnknownNameError, "Did you mean 'nf4'"),
    Case("unknown-technique", lambda env: granite(technique="qlora+chkpt"), UnknownNameError, "Did you mean 'ckpt'"),
    Case("two-quantizations", lambda env: internvl(technique="int8+nf4"), ConfigurationError, "keep one"),
    Case("dq-without-4bit", lambda env: internvl(technique="int8+dq"), ConfigurationError, "nf4+dq"),
    Case("technique-and-options", lambda env: internvl(technique="nf4", lora=True), ConfigurationError, "not both"),
    Case(
        "quantization-mapping-typo",
        lambda env: granite(quantization={"type": "nf4", "double_qant": True}),
        ConfigurationError,
        "Did you mean 'double_quant'",
    ),
    Case(
        "lora-targets-match-nothing",
        lambda env: internvl(lora={"target_modules": ["qkv"]}),
        ConfigurationError,
        "None of the LoRA target modules",
    ),
    Case("lora-rank-zero", lambda env: granite(lora={"r": 0}), ConfigurationError, "positive integer"),
    Case("lora-dropout-one", lambda env: internvl(lora={"dropout": 1.0}), ConfigurationError, "[0, 1)"),
    Case("lora-added-twice", _lora_twice, ConfigurationError, "add them once"),
    Case("checkpointing-not-bool", lambda env: granite(activation_checkpointing="yes"), ConfigurationError, "true"),
    Case("quantize-meta-weights", _quantize_on_meta, ConfigurationError, "load or initialise the weights"),
    Case("experts-from-a-dense-layer", _experts_from_a_dense_layer, ConfigurationError, "not a fused expert stack"),
]


# -- the lifecycle: checkpoints, configs and arguments a fine-tune meets ----------------------------------
def _load_other_technique(env: dict) -> None:
    internvl(in_chans=4).load_state_dict(internvl(in_chans=4, technique="nf4+dq").state_dict())


def _load_other_bands(env: dict) -> None:
    granite(in_chans=5, technique="qlora").load_state_dict(granite(in_chans=4, technique="qlora").state_dict())


def _load_other_backbone(env: dict) -> None:
    internvl(in_chans=4).load_state_dict(env["granite"].state_dict())


def _config_without_dimensions(env: dict, backbone: str, keys: tuple[str, ...]) -> None:
    import shutil

    source = env[f"{backbone}_dir"][0]
    directory = env["tmp"] / f"{backbone}_without_dimensions"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    for key in keys:
        config.pop(key, None)
    (directory / "config.json").write_text(json.dumps(config))
    (internvl if backbone == "internvl" else granite)(weights=str(directory))


def _segmentation_with_no_classes(env: dict) -> None:
    from earthmind_compat.recipes import build_model

    build_model("internvl2_5_4b", "UperNetDecoder", num_classes=0, preset="tiny")


LIFECYCLE_CASES = [
    Case("checkpoint-other-technique", _load_other_technique, WeightsError, "technique 'nf4+dq'"),
    Case("checkpoint-other-bands", _load_other_bands, WeightsError, "takes 4 input bands and this model's 5"),
    Case("checkpoint-other-backbone", _load_other_backbone, WeightsError, "holds another model"),
    Case(
        "config-without-width",
        lambda env: _config_without_dimensions(env, "internvl", ("hidden_size", "intermediate_size")),
        WeightsError,
        "config.json does not describe these tensors",
    ),
    Case(
        "config-without-depth",
        lambda env: _config_without_dimensions(
            env, "granite", ("num_hidden_layers", "layer_types", "layers_block_type")
        ),
        WeightsError,
        "blocks the checkpoint does not hold",
    ),
    Case(
        "config-without-granite-width",
        lambda env: _config_without_dimensions(env, "granite", ("hidden_size",)),
        WeightsError,
        "not a valid Granite 4.0 config",
    ),
    Case("bool-as-string-false", lambda env: internvl(with_projector="false"), ConfigurationError, "true or false"),
    Case("bool-as-string-yes", lambda env: granite(bidirectional_mamba="yes"), ConfigurationError, "true or false"),
    Case("bool-as-int", lambda env: internvl(keep_cls_token=1), ConfigurationError, "true or false"),
    Case(
        "bool-in-quantization-mapping",
        lambda env: internvl(quantization={"type": "nf4", "double_quant": "false"}),
        ConfigurationError,
        "double_quant must be true or false",
    ),
    Case(
        "band-in-two-modalities",
        lambda env: BACKBONE_REGISTRY.build(
            "earthmind_v1", preset="tiny", modalities={"sar": ["VV", "RED"], "optical": ["RED", "GREEN", "BLUE"]}
        ),
        ConfigurationError,
        "share band names ['RED']",
    ),
    Case("num-classes-zero", _segmentation_with_no_classes, ConfigurationError, "num_classes must be a positive"),
    Case("dtype-unknown", lambda env: granite(dtype="float64"), ConfigurationError, "bfloat16"),
]

CATALOGUE = INPUT_CASES + BUILD_CASES + WEIGHT_CASES + TECHNIQUE_CASES + LIFECYCLE_CASES


@pytest.fixture
def env(tiny_internvl, tiny_granite, tiny_internvl_vision_dir, tiny_granite_dir, tmp_path):
    return {
        "internvl": tiny_internvl,
        "granite": tiny_granite,
        "internvl_dir": tiny_internvl_vision_dir,
        "granite_dir": tiny_granite_dir,
        "tmp": tmp_path,
        "marker": tmp_path / "pwned",
    }


def test_catalogue_is_large_and_unique():
    ids = [case.id for case in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


@pytest.mark.timeout(60)  # a bad input must fail, not hang: pytest-timeout turns a hang into a failure
@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.id)
def test_bad_input_gives_a_clear_error(case, env):
    with pytest.raises(case.error) as caught:
        case.action(env)
    assert isinstance(caught.value, EarthMindCompatError)
    assert not isinstance(caught.value, KeyError)
    assert case.says in str(caught.value), str(caught.value)
    assert not env["marker"].exists(), "a pickle payload was executed"


def test_missing_local_weights_fail_offline_with_one_cache_lookup(monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(WeightsError, match="offline mode is on"):
        granite(weights="ibm-granite/not-in-any-cache")
    assert len(calls) == 1 and calls[0]["local_files_only"] is True, "offline: one cache lookup, no retries"


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    env = {"tmp": tmp_path, "marker": marker}
    for allow in (False, True):
        with pytest.raises(UnsafeCheckpointError):
            internvl(weights=str(_pickle_only(env)), allow_pickle=allow)
        assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(marker)))  # the payload is real: plain pickle does run it
    assert marker.exists()


def test_plain_tensor_pickle_loads_when_opted_in(tmp_path, tiny_internvl_vision_dir):
    from safetensors.torch import load_file

    source, reference = tiny_internvl_vision_dir
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((source / "config.json").read_text())
    torch.save(load_file(str(source / "model.safetensors")), directory / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        internvl(weights=str(directory))
    model = internvl(weights=str(directory), allow_pickle=True).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model(x)[-1], call_with_hidden_states(reference, x).hidden_states[-1], atol=1e-5)


def test_no_trust_remote_code_anywhere_in_the_package():
    package = Path(earthmind_compat.__file__).parent
    offenders = [p for p in package.rglob("*.py") if "trust_remote_code=True" in p.read_text().replace(" ", "")]
    assert offenders == []


# -- registry, CLI and versions ---------------------------------------------------------------------------


def test_cli_unknown_backbone_exits_with_suggestion(capsys):
    assert cli_main(["check", "--backbones", "internvl"]) == 2
    assert "Did you mean 'internvl2_5_4b'" in capsys.readouterr().err


def test_registry_conflict_is_reported(replaced_registry_entry):
    replaced_registry_entry("internvl2_5_4b", lambda **kwargs: None)
    with pytest.raises(RegistryConflictError, match="Import earthmind_compat before"):
        earthmind_compat.register_all()


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        ({"torch": "2.6.0", "terratorch": "1.2.11", "transformers": "5.23.0"}, "torch 2.6.0 is outside"),
        ({"torch": "2.14.1+cu130", "terratorch": "0.99.9", "transformers": "5.23.0"}, "terratorch 0.99.9"),
        ({"torch": "2.14.1", "terratorch": "1.2.11", "transformers": "6.0.0"}, "transformers 6.0.0"),
    ],
)
def test_versions_outside_the_matrix_warn(versions, expected):
    with pytest.warns(UntestedVersionWarning, match=expected):
        warn_if_untested(versions)


def test_versions_inside_the_matrix_are_quiet():
    from earthmind_compat.compat import TESTED_RANGES

    assert untested_versions({package: high for package, (_, high) in TESTED_RANGES.items()}) == []
    assert untested_versions({package: f"{low}+cu130" for package, (low, _) in TESTED_RANGES.items()}) == []


# -- no network, determinism ---------------------------------------------------------------------------------


def test_socket_guard_blocks_outgoing_connections():
    from conftest import NetworkAccessError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(NetworkAccessError):
        sock.connect(("93.184.216.34", 443))


def test_hugging_face_offline_mode_is_on():
    from earthmind_compat.weights import hub_offline

    assert hub_offline()


@pytest.mark.parametrize("name", ["internvl2_5_4b", "granite_4_tiny"])
def test_same_seed_gives_identical_outputs(name):
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = BACKBONE_REGISTRY.build(name, preset="tiny").eval()
        x = torch.randn(2, 3, 64 if name.startswith("granite") else 56, 64 if name.startswith("granite") else 56)
        with torch.no_grad():
            return model(x)

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[-1], other[-1])


def test_float64_input_is_accepted_and_matches_float32(tiny_internvl):
    x = torch.randn(1, 4, 56, 56)
    with torch.no_grad():
        wide = tiny_internvl(x.double())[-1]
        assert wide.dtype == torch.float64  # features come back in the input's dtype
        assert torch.allclose(wide.float(), tiny_internvl(x)[-1])


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["check", "--json", "{blocker}/results.json"], "is a file, not a directory"),
        (["check", "--json", "{tmp}"], "is a directory; give a file name"),
        (["benchmark", "--output", "{blocker}"], "is a file; give a directory"),
        (["optimize", "--backbone", "internvl2_5_4b", "--output", "{blocker}/out"], "is a file, not a directory"),
        (["synthetic-data", "{blocker}/data"], "is a file, not a directory"),
        (["export-adapters", "-c", "a.yaml", "--ckpt_path", "b.ckpt", "--output", "{tmp}"], "is a directory"),
    ],
    ids=[
        "check-json-under-a-file",
        "check-json-a-directory",
        "benchmark-output-a-file",
        "optimize-output",
        "synthetic-data",
        "export-output-a-directory",
    ],
)
def test_unwritable_output_paths_are_argument_errors_before_any_work(arguments, says, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker, tmp=tmp_path) for a in arguments]
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert says in error and "Traceback" not in error
