"""earthmind_compat.gc_pause: the package's import pauses automatic garbage collection and restores the caller's."""

from __future__ import annotations

import gc

import pytest

from earthmind_compat.gc_pause import garbage_collection_paused

pytestmark = pytest.mark.reliability


@pytest.fixture
def restore_gc_setting():
    """Whatever a test does to the collector's setting, the next test starts with it as it was."""
    was_enabled = gc.isenabled()
    yield
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_collection_is_off_inside_and_back_on_after(restore_gc_setting) -> None:
    gc.enable()
    with garbage_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_caller_that_disabled_collection_keeps_it_disabled(restore_gc_setting) -> None:
    gc.disable()
    with garbage_collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_collection_comes_back_when_the_block_raises(restore_gc_setting) -> None:
    gc.enable()
    with pytest.raises(ImportError, match="a failed import"), garbage_collection_paused():
        raise ImportError("a failed import")
    assert gc.isenabled()
