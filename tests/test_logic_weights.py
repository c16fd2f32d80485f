"""Layer 6: finding and reading checkpoint files (``earthmind_compat.weights``), against hand-written values.

Fast tests (tiny tensors written with ``safetensors`` here, no model builds) so that ``nox -s mutation`` can
run them for every mutant of the module.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from internvl_layouts import hub_snapshot, use_hub_cache
from safetensors.torch import save_file

from earthmind_compat import weights
from earthmind_compat.errors import UnsafeCheckpointError, WeightsError

pytestmark = pytest.mark.reliability


def write(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    save_file(tensors, str(path))
    return path


def two_files(directory: Path) -> Path:
    """``a.weight`` [2, 3] and ``a.bias`` [2] in one file, ``b.weight`` [4] in another."""
    write(directory, "part-1.safetensors", {"a.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(2)})
    write(directory, "part-2.safetensors", {"b.weight": torch.full((4,), 7.0)})
    return directory


# -- offline mode and hub ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hub", "transformers", "offline"),
    [
        ("1", "", True),
        ("true", "", True),
        ("YES", "", True),
        ("On", "", True),
        ("", "1", True),
        ("0", "1", True),
        ("0", "0", False),
        ("", "", False),
        ("false", "no", False),
        ("2", "", False),
    ],
)
def test_hub_offline_reads_either_variable(monkeypatch, hub, transformers, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", hub)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", transformers)
    assert weights.hub_offline() is offline


def test_hub_offline_without_the_variables(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert weights.hub_offline() is False


@pytest.mark.parametrize(
    ("text", "is_hub_id"),
    [
        ("OpenGVLab/InternVL2_5-4B", True),
        ("a/b", True),
        ("a", False),
        ("a/b/c", False),
        ("/b", False),
        ("a/", False),
        ("./a", False),
        ("../a", False),
        ("~/a", False),
        ("", False),
    ],
)
def test_looks_like_hub_id(text, is_hub_id):
    assert weights._looks_like_hub_id(text) is is_hub_id


# -- resolving weights= --------------------------------------------------------------------------------------


def test_an_existing_directory_is_returned_as_it_is(tmp_path):
    assert weights.resolve_weights_dir(tmp_path) == tmp_path
    assert weights.resolve_weights_dir(str(tmp_path)) == tmp_path


def test_a_file_is_refused_naming_the_directory_to_pass(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(WeightsError) as error:
        weights.resolve_weights_dir(path)
    assert str(error.value) == (
        f"weights={str(path)!r} is a file; pass the directory that holds config.json and the "
        "*.safetensors files (as written by save_pretrained)."
    )


@pytest.mark.parametrize("text", ["no/such/dir", "./missing", "missing"])
def test_a_missing_path_that_is_no_hub_id_is_refused(text):
    with pytest.raises(WeightsError) as error:
        weights.resolve_weights_dir(text)
    assert str(error.value) == (
        f"No weights directory at {text!r}. Pass an existing directory written by save_pretrained, "
        "or a hub id of the form 'owner/name'."
    )


def test_a_hub_id_in_the_cache_is_its_snapshot(monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, tmp_path / "hub")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    snapshot = hub_snapshot(tmp_path / "hub", "someone/model", tmp_path / "repo")
    hub_snapshot(tmp_path / "hub", "someone/other", tmp_path / "repo", revision="1" * 40)
    assert weights.resolve_weights_dir("someone/model") == snapshot


def test_a_hub_id_absent_from_the_cache_offline_says_how_to_get_it(monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as error:
        weights.resolve_weights_dir("someone/nothing-here")
    text = str(error.value)
    assert text.startswith(
        "Could not get weights 'someone/nothing-here': offline mode is on (HF_HUB_OFFLINE=1) and the files are not "
        "in the local cache. Download them on a connected machine with `huggingface-cli download "
        "someone/nothing-here` and pass the local directory as weights=... ("
    )
    assert re.fullmatch(r".* \((\w+Error|\w+Exception): .+\)", text, flags=re.S), "the cause, by type and text"


def test_a_hub_id_that_cannot_be_fetched_online_names_the_hub(monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with pytest.raises(WeightsError) as error:
        weights.resolve_weights_dir("someone/nothing-here")
    assert str(error.value).startswith(
        "Could not get weights 'someone/nothing-here': the hub could not be reached or the repository does not "
        "exist. Download them"
    )


# -- config.json -----------------------------------------------------------------------------------------------


def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 8}')
    assert weights.read_config(tmp_path) == {"model_type": "qwen2", "hidden_size": 8}


def test_read_config_without_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"has no config.json; it does not look like a save_pretrained"):
        weights.read_config(tmp_path)


def test_read_config_of_broken_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config.json is not valid JSON"):
        weights.read_config(tmp_path)


def test_remote_code_is_refused_naming_the_model_type(tmp_path):
    weights.refuse_remote_code({"model_type": "internvl_chat"}, tmp_path)  # no auto_map: nothing to refuse
    with pytest.raises(UnsafeCheckpointError) as error:
        weights.refuse_remote_code({"model_type": "internvl_chat", "auto_map": {}}, tmp_path)
    assert str(error.value) == (
        f"{tmp_path} needs remote code (config.json has auto_map, model_type='internvl_chat'). earthmind-compat "
        "never sets trust_remote_code. Use a checkpoint in the native transformers format (the '-hf' "
        "repositories); the remote layouts of InternVL (internvl_chat) and EarthMind (sa2va_chat) are read as "
        "data by internvl2_5_4b and earthmind_v1 (earthmind_compat.backbones.loader)."
    )


# -- which files ------------------------------------------------------------------------------------------------


def test_safetensors_files_are_listed_in_order_and_win_over_pickles(tmp_path):
    two_files(tmp_path)
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert [p.name for p in weights.safetensors_files(tmp_path)] == ["part-1.safetensors", "part-2.safetensors"]


def test_pickles_alone_are_refused_unless_allowed(tmp_path):
    for name in ("b.bin", "a.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UnsafeCheckpointError) as error:
        weights.safetensors_files(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} holds only pickle checkpoints (a.pt, b.bin), which can run arbitrary code when loaded. "
        "Convert them to safetensors, or pass allow_pickle=True to read them with torch.load(weights_only=True)."
    )
    with pytest.raises(UnsafeCheckpointError, match="holds only pickle checkpoints"):
        weights.CheckpointFiles(tmp_path)  # refused by default there too
    assert [p.name for p in weights.safetensors_files(tmp_path, allow_pickle=True)] == ["a.pt", "b.bin"]


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_directory_without_checkpoint_files(tmp_path, allow_pickle):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"holds no \*.safetensors file"):
        weights.safetensors_files(tmp_path, allow_pickle=allow_pickle)


# -- reading lazily ---------------------------------------------------------------------------------------------


def test_checkpoint_files_name_shape_and_read_only_what_is_asked(tmp_path):
    files = weights.CheckpointFiles(two_files(tmp_path), config={"model_type": "x"})
    assert sorted(files.keys) == ["a.bias", "a.weight", "b.weight"]
    assert files.config == {"model_type": "x"}
    assert files.shapes(["a.weight", "b.weight"]) == {"a.weight": (2, 3), "b.weight": (4,)}
    loaded = files.load(["a.weight", "b.weight"])
    assert sorted(loaded) == ["a.weight", "b.weight"]
    assert torch.equal(loaded["a.weight"], torch.arange(6.0).view(2, 3))
    assert torch.equal(loaded["b.weight"], torch.full((4,), 7.0))
    assert files.load([]) == {} and files.shapes([]) == {}
    assert weights.CheckpointFiles(tmp_path).config == {}


def test_only_the_files_holding_the_keys_are_opened(tmp_path):
    files = weights.CheckpointFiles(two_files(tmp_path))
    (tmp_path / "part-2.safetensors").write_bytes(b"corrupt")  # never opened for a.* keys
    assert torch.equal(files.load(["a.bias"])["a.bias"], torch.ones(2))
    grouped = files._by_file(["a.weight", "b.weight", "a.bias"])
    assert grouped == {
        tmp_path / "part-1.safetensors": ["a.weight", "a.bias"],
        tmp_path / "part-2.safetensors": ["b.weight"],
    }
    with pytest.raises(WeightsError, match=r"part-2.safetensors is not a readable safetensors file"):
        files.load(["b.weight"])


def index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / weights.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    two_files(tmp_path)
    write(tmp_path, "stray.safetensors", {"stray": torch.zeros(1)})  # not in the index: not a part
    index(tmp_path, {"a.weight": "part-1.safetensors", "b.weight": "part-2.safetensors"})
    files = weights.CheckpointFiles(tmp_path)
    assert files.keys == ["a.weight", "b.weight"]
    assert files.shapes(["b.weight"]) == {"b.weight": (4,)}


@pytest.mark.parametrize(
    ("absent", "says"),
    [
        (["part-2.safetensors"], r"lists 2 shards but \['part-2.safetensors'\] is not there"),
        (["part-1.safetensors", "part-2.safetensors"], r"lists 2 shards but \[.*\] are not there"),
    ],
)
def test_an_index_naming_a_missing_shard(tmp_path, absent, says):
    two_files(tmp_path)
    index(tmp_path, {"a.weight": "part-1.safetensors", "b.weight": "part-2.safetensors"})
    for name in absent:
        (tmp_path / name).unlink()
    with pytest.raises(WeightsError, match=says) as error:
        weights.CheckpointFiles(tmp_path)
    assert str(error.value).endswith(
        " not there. Download the whole repository (every model-*.safetensors file) into that directory."
    )


@pytest.mark.parametrize("text", ["{broken", '{"metadata": {}}', "[1, 2]"])
def test_an_unreadable_index(tmp_path, text):
    two_files(tmp_path)
    (tmp_path / weights.SAFETENSORS_INDEX).write_text(text)
    with pytest.raises(WeightsError, match=r"is not a valid safetensors index \(no readable 'weight_map'"):
        weights.CheckpointFiles(tmp_path)


def test_pickles_are_read_once_when_allowed(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2, 2), "step": 3}}, tmp_path / "a.ckpt")
    torch.save({"v": torch.zeros(5)}, tmp_path / "b.bin")
    files = weights.CheckpointFiles(tmp_path, allow_pickle=True)
    assert sorted(files.keys) == ["v", "w"]  # the Lightning state_dict unwrapped, non-tensors dropped
    assert files.shapes(["w", "v"]) == {"w": (2, 2), "v": (5,)}
    assert torch.equal(files.load(["v"])["v"], torch.zeros(5))
    assert weights.checkpoint_shapes(tmp_path) == {}  # shapes of pickles need loading them


class NotATensor:
    """An object ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_a_pickle_holding_other_objects_is_refused_with_the_first_line_of_the_cause(tmp_path):
    torch.save({"w": torch.ones(1), "object": NotATensor()}, tmp_path / "a.bin")
    with pytest.raises(pickle.UnpicklingError) as cause:  # what torch says: several lines
        torch.load(tmp_path / "a.bin", weights_only=True)
    lines = str(cause.value).strip().splitlines()
    assert len(lines) > 1
    with pytest.raises(UnsafeCheckpointError) as error:
        weights.CheckpointFiles(tmp_path, allow_pickle=True)
    assert str(error.value) == (
        f"{tmp_path / 'a.bin'} could not be read with torch.load(weights_only=True) (UnpicklingError: {lines[0]}). "
        "It holds objects other than tensors, which earthmind-compat will not unpickle; convert it to "
        "safetensors on a machine you trust."
    )


def test_an_empty_pickle_is_refused_naming_the_cause_without_text(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")  # torch.load raises EOFError with no message
    with pytest.raises(UnsafeCheckpointError) as error:
        weights.CheckpointFiles(tmp_path, allow_pickle=True)
    assert str(error.value).startswith(
        f"{tmp_path / 'a.bin'} could not be read with torch.load(weights_only=True) (EOFError: ). "
    )


def test_a_file_that_is_no_pickle_is_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(UnsafeCheckpointError, match=r"a.bin could not be read with torch.load\(weights_only=True\)"):
        weights.CheckpointFiles(tmp_path, allow_pickle=True)


def test_a_truncated_safetensors_file(tmp_path):
    path = write(tmp_path, "model.safetensors", {"w": torch.ones(64)})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(WeightsError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        weights.CheckpointFiles(tmp_path)


def test_checkpoint_shapes_reads_every_file(tmp_path):
    assert weights.checkpoint_shapes(two_files(tmp_path)) == {"a.weight": (2, 3), "a.bias": (2,), "b.weight": (4,)}


# -- shapes against a model on the meta device -------------------------------------------------------------------


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.ModuleDict(
            {
                "layers": torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)]),
                "head": torch.nn.Linear(2, 1),
            }
        )


def checkpoint(directory: Path, **shapes: tuple[int, ...]) -> Path:
    write(directory, "model.safetensors", {key.replace("__", "."): torch.zeros(shape) for key, shape in shapes.items()})
    return directory


FULL = {
    "layers__0__weight": (2, 3),
    "layers__0__bias": (2,),
    "layers__1__weight": (2, 2),
    "layers__1__bias": (2,),
    "head__weight": (1, 2),
}


def test_matching_shapes_pass(tmp_path):
    assert weights.check_shapes_on_meta(meta_model(), checkpoint(tmp_path, **FULL)) is None


def test_a_checkpoint_under_a_prefix(tmp_path):
    prefixed = {f"model__{key}": shape for key, shape in FULL.items()}
    weights.check_shapes_on_meta(meta_model(), checkpoint(tmp_path, **prefixed), prefixes=("other.", "model."))
    with pytest.raises(WeightsError, match=r"none of its 5 tensors"):
        weights.check_shapes_on_meta(meta_model(), tmp_path, prefixes=("other.",))


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    directory = checkpoint(tmp_path, **{**FULL, "layers__1__weight": (2, 5)})
    with pytest.raises(WeightsError) as error:
        weights.check_shapes_on_meta(meta_model(), directory)
    assert str(error.value) == (
        f"{directory}: tensor layers.1.weight is [2, 5] but the model built from its config.json expects [2, 2]. "
        "config.json does not describe these tensors (a missing dimension falls back to the library's default "
        "size); fix config.json or pass the directory it was saved with."
    )
    weights.check_shapes_on_meta(meta_model(), directory, ignore=["layers.1.weight"])


def test_a_mismatch_after_tensors_that_are_skipped_is_still_found(tmp_path):
    # "head.weight" (ignored) and "extra" (not the model's) come before "layers.1.weight" in the file
    directory = checkpoint(tmp_path, **{**FULL, "extra": (9,), "layers__1__weight": (2, 5)})
    with pytest.raises(WeightsError, match=r"tensor layers.1.weight is \[2, 5\]"):
        weights.check_shapes_on_meta(meta_model(), directory, ignore=["head.weight"])


def test_blocks_the_checkpoint_lacks(tmp_path):
    first_layer_only = {k: v for k, v in FULL.items() if not k.startswith("layers__1")}
    directory = checkpoint(tmp_path, **first_layer_only)
    with pytest.raises(WeightsError) as error:
        weights.check_shapes_on_meta(meta_model(), directory)
    assert str(error.value) == (
        f"{directory}: the model built from its config.json has blocks the checkpoint does not hold (e.g. "
        "layers.1; 1 in all). config.json does not describe these tensors (a missing num_hidden_layers falls back "
        "to the library's default depth); fix config.json."
    )


def deep_meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1) for _ in range(12)])
        return torch.nn.ModuleDict({"a": blocks, "b": torch.nn.ModuleList([torch.nn.Linear(1, 1)])})


@pytest.mark.parametrize(
    ("held", "first_absent"),
    [
        (["a.0", "a.1", "b.0"], "a.2"),  # by number, not as text ("a.10" < "a.2")
        (["a.0", "b.0"], "a.1"),
        (["a.0", *(f"a.{i}" for i in range(2, 12))], "a.1"),  # by container first: "b.0" has the smaller number
    ],
)
def test_the_first_absent_block_is_named_in_order(tmp_path, held, first_absent):
    tensors = {f"{block}.weight".replace(".", "__"): (1, 1) for block in held}
    with pytest.raises(WeightsError, match=rf"\(e.g. {re.escape(first_absent)}; \d+ in all\)"):
        weights.check_shapes_on_meta(deep_meta_model(), checkpoint(tmp_path, **tensors))


def test_a_checkpoint_of_another_model(tmp_path):
    directory = checkpoint(tmp_path, other__d=(1,), other__a=(1,), other__c=(1,), other__b=(1,))
    with pytest.raises(WeightsError) as error:
        weights.check_shapes_on_meta(meta_model(), directory)
    assert str(error.value) == (
        f"{directory}: none of its 4 tensors (e.g. ['other.a', 'other.b', 'other.c']) belongs to the model built "
        "from its config.json; is it a checkpoint of this model?"
    )


def test_nothing_to_compare_for_pickles(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "a.bin")
    assert weights.check_shapes_on_meta(meta_model(), tmp_path) is None


def test_numbered_blocks():
    keys = ["encoder.layer.3.mlp.fc1.weight", "encoder.layer.3.norm.weight", "embed.weight", "a.0.b.1.c", "head.12"]
    assert weights._numbered_blocks(keys) == {("encoder.layer", "3"), ("a", "0"), ("head", "12")}
