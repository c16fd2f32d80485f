"""Shared test set-up: GPU auto-skip, hypothesis profiles, offline mode, one CPU thread and a socket guard."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

# No network, ever: Hugging Face offline mode before anything imports huggingface_hub. Forced, not
# defaulted: a developer's HF_HUB_OFFLINE=0 must not let the suite reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One intra-op thread, before torch is imported (and inherited by the suite's subprocesses: the terratorch
# executable, DDP workers). The suite's models are tiny: their tensors are far below the size at which
# torch splits an op across threads, so a second thread buys nothing, while OpenMP's idle threads spin for
# CPU; on the 2-core CI machine that made the lifecycle tests 5-8x slower whenever anything else ran
# (measured in the note of issue 14). Set OMP_NUM_THREADS yourself to test with more threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ci: random examples (each run explores new ones; a failure prints the blob that replays it) and no
# shrinking: every example builds TerraTorch models, so shrinking a failure can take many minutes per test
# (seen in a matrix cell). dev: more examples, shrinking to a minimal example, and hypothesis' example
# database; a scheduled workflow runs it (.github/workflows/tests.yml, job hypothesis-dev).
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    print_blob=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: ``EARTHMIND_GPU_ON_CPU=1`` runs ``gpu``-marked tests on CPU at tiny size, so their code path is tested.
GPU_ON_CPU = os.environ.get("EARTHMIND_GPU_ON_CPU", "") == "1"


#: The suite's layers (markers in pyproject.toml); every test belongs to at least one.
LAYERS = frozenset({"registry", "shapes", "numerics", "benchmark", "e2e", "reliability", "gpu"})


def pytest_configure(config: pytest.Config) -> None:
    """Register the backbones in TerraTorch before any test module is collected, in every process that runs tests.

    Not in pytest-xdist's controller (``-n 2``), which only hands tests to its workers: importing TerraTorch there
    (about 10 s) would only delay the workers' start.
    """
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import earthmind_compat  # noqa: F401

    # The import built about a million long-lived objects (torch, transformers, TerraTorch; the package pauses the
    # collector meanwhile, earthmind_compat.gc_pause). Each later full collection would walk them again: 5.5-7 s per
    # xdist worker over the suite, 1.8-3.2 s once they are frozen (kept out of collections) until the end
    # (measured with gc.callbacks).
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze the objects the test modules' imports built too (see :func:`pytest_configure`)."""
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Hand the frozen objects back to the collector, so the process ends as any other.

    At exit the interpreter collects them and extension modules check that everything they made is gone:
    triton's nanobind bindings print 'leaked ... instances' for frozen objects.
    """
    gc.unfreeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    unmarked = [item.nodeid for item in items if not LAYERS & {mark.name for mark in item.iter_markers()}]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} tests belong to no layer ({', '.join(sorted(LAYERS))}), e.g. {unmarked[:3]}; "
            "mark them (pytestmark or @pytest.mark.<layer>)."
        )

    # `slow` tests first (a stable sort: pytest-randomly's shuffle stays within each group). Under pytest-xdist's
    # work-stealing scheduler (`--dist worksteal` in pyproject.toml) a worker that runs out of tests takes over
    # the other's queue, but not a test that is already running: with the long tests at the start, neither
    # worker is left alone with one at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

    if torch.cuda.is_available() or GPU_ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs CUDA (set EARTHMIND_GPU_ON_CPU=1 to run at tiny size on CPU)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords hold parameter ids too, and a case whose id is
        # "gpu" (e.g. a refused device name) would be skipped without being a GPU test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to open a network connection."""


_LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")
_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in _LOCAL_HOSTS:
        return _real_connect(self, address)
    raise NetworkAccessError(f"Test tried to reach {address!r}; tests must not use the network.")


@pytest.fixture(autouse=True, scope="session")
def no_network() -> None:
    """Forbid outgoing connections (loopback and Unix sockets stay allowed, e.g. for gloo)."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state (torch, numpy, random), whatever ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def replaced_registry_entry():
    """Put an object under a name of TerraTorch's backbone registry for one test, and restore it after.

    TerraTorch offers no public way to unregister or replace an entry, so this is the one place that writes
    its private ``_registry`` dict (the same attribute in every TerraTorch release from 0.99.7 to 1.2.13).
    """
    from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY

    store = TERRATORCH_BACKBONE_REGISTRY._registry
    saved: dict = {}

    def replace(name: str, value: object) -> None:
        saved.setdefault(name, store.get(name))
        store[name] = value

    yield replace
    for name, value in saved.items():
        if value is None:
            store.pop(name, None)
        else:
            store[name] = value


@pytest.fixture
def device() -> str:
    """Device for gpu-marked tests: CUDA when present, else CPU (tiny size) under EARTHMIND_GPU_ON_CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- tiny checkpoints written by the real save_pretrained, read back by the real loading path --------------


@pytest.fixture(scope="session")
def tiny_internvl_vision_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny ``InternVLVisionModel`` saved as safetensors; returns ``(directory, model)``."""
    import torch
    from transformers import InternVLVisionModel

    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    torch.manual_seed(1)
    model = InternVLVisionModel(vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None)).eval()
    _randomize(model)
    directory = tmp_path_factory.mktemp("internvl_vision")
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


@pytest.fixture(scope="session")
def tiny_internvl_full_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny whole ``InternVLForConditionalGeneration`` (tower, projector, Qwen2) saved as safetensors."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    from earthmind_compat.backbones.internvl import INTERNVL_PRESETS, vision_config_from_preset

    torch.manual_seed(2)
    vision = vision_config_from_preset(INTERNVL_PRESETS["tiny"], 3, None)
    text = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=64,
    )
    config = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=5)
    model = InternVLForConditionalGeneration(config).eval()
    _randomize(model)
    directory = tmp_path_factory.mktemp("internvl_full")
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


@pytest.fixture(scope="session")
def tiny_granite_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny ``GraniteMoeHybridForCausalLM`` saved as safetensors; returns ``(directory, model)``."""
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from earthmind_compat.backbones.granite import GRANITE_PRESETS

    torch.manual_seed(3)
    settings = {k: v for k, v in GRANITE_PRESETS["tiny"].items() if k != "patch_size"}
    model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**settings)).eval()
    directory = tmp_path_factory.mktemp("granite")
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def _randomize(model) -> None:
    """Give zero-initialised tensors (CLS token, positions) random values so a lost tensor is noticed."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "cls_token" in name or "position_embeddings" in name:
                param.normal_(0, 0.5)
            if "lambda_" in name:
                param.uniform_(0.5, 1.5)


def _gloo_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-process run's directory: under pytest-xdist, the one that every worker of the run shares."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, above each worker's own
    return root / "gloo"


@pytest.fixture(autouse=True, scope="session")
def gloo_run_started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start the two-process gloo run in the background when the session starts, if a selected test reads it.

    It then runs while the suite goes on, instead of while a test waits for it. Under pytest-xdist every worker
    has its own session: the first to create the directory's ``started`` file starts the run.
    """
    if not any("gloo_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return
    import two_process_runs

    out_dir = _gloo_run_dir(tmp_path_factory)
    out_dir.mkdir(exist_ok=True)
    try:
        os.close(os.open(out_dir / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another worker started it
    two_process_runs.start(str(out_dir))


@pytest.fixture(scope="session")
def gloo_run(gloo_run_started: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the two-process gloo run (DDP steps, then an FSDP2 step), once it has finished."""
    import two_process_runs

    out_dir = _gloo_run_dir(tmp_path_factory)
    try:
        two_process_runs.wait(str(out_dir))
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    return out_dir
