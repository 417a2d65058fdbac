"""A stylize worker fails closed: no checkpoint for a mode it serves, no start, unless the
untrained network is asked for by name."""

from __future__ import annotations

import pytest

from capvst.errors import CheckpointError
from capvst.preflight import check_models, require_checkpoints
from capvst.settings import Settings


def test_a_mode_without_checkpoint_is_refused_naming_the_settings():
    s = Settings(checkpoint_artistic="/models/art_image.pt")
    with pytest.raises(CheckpointError) as err:
        require_checkpoints(s)
    msg = err.value.message
    assert "CAPVST_CHECKPOINT_PHOTOREALISTIC" in msg and "CAPVST_ALLOW_UNTRAINED=1" in msg
    assert "CAPVST_CHECKPOINT_ARTISTIC" not in msg  # only what is missing


def test_allowing_the_untrained_network_names_the_modes_that_use_it():
    s = Settings(allow_untrained=True, checkpoint_artistic="/models/art_image.pt")
    assert require_checkpoints(s) == ["photorealistic"]
    assert require_checkpoints(Settings(allow_untrained="1")) == ["photorealistic",
                                                                  "artistic"]


def test_only_the_served_modes_need_a_checkpoint(checkpoints):
    s = Settings(worker_modes="artistic", checkpoint_artistic=str(checkpoints["artistic"]))
    assert require_checkpoints(s) == []
    assert set(check_models(s)) == {"artistic"}


def test_the_untrained_mode_is_not_loaded_by_the_check(checkpoints):
    s = Settings(allow_untrained=True,
                 checkpoint_photorealistic=str(checkpoints["photorealistic"]))
    models = check_models(s)
    assert models["artistic"] == "untrained" and models["photorealistic"] != "untrained"
