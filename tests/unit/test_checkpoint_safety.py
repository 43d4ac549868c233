"""Checkpoint files that would run code when unpickled are refused before anything loads them.

DeepSpeed's checkpoint engine unpickles with `torch.load(weights_only=False)`; Temper scans its
files first (`refuse_unsafe_pickles`). The crafted files here would create a marker file when
unpickled: they are refused, naming the call, and the marker never appears."""

from __future__ import annotations

import fractions
import importlib
import os
import pickle

import pytest
import torch

from app.artifacts import UnsafeCheckpointError, refuse_unsafe_pickles


class _CreatesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the crafted checkpoint's code ran"


def test_a_torch_saved_file_that_calls_os_system_is_refused_unrun(tmp_path, marker):
    folder = tmp_path / "ckpt" / "deepspeed" / "step"
    folder.mkdir(parents=True)
    torch.save({"optimizer_state_dict": _CreatesMarker(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"optim_states\.pt: refused: unpickling it would call \S*system"):
        refuse_unsafe_pickles(tmp_path / "ckpt", frozenset())


def test_a_bare_pickle_named_like_a_checkpoint_is_refused_unrun(tmp_path, marker):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": _CreatesMarker(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="not a torch.save checkpoint"):
        refuse_unsafe_pickles(tmp_path, frozenset())


def test_tensors_and_the_allowed_state_classes_pass(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3, "names": ["a"]}, tmp_path / "plain.pt")
    torch.save({"ratio": fractions.Fraction(1, 3)}, tmp_path / "with_class.pt")
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        refuse_unsafe_pickles(tmp_path, frozenset())
    refuse_unsafe_pickles(tmp_path, frozenset({"fractions.Fraction"}))  # allowed by name: passes


def test_the_deepspeed_allow_list_names_classes_deepspeed_has():
    from pipelines.strategies import DEEPSPEED_STATE_GLOBALS

    for name in DEEPSPEED_STATE_GLOBALS:
        module, _, attr = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), attr), type), name
