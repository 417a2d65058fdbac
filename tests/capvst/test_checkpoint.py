"""Checkpoint loading: the authors' format, refusals, model ids, metadata."""

import hashlib
import io
import os

import pytest
import torch

from capvst.errors import CheckpointError
from capvst.model import load_bytes, load_file, save_checkpoint, untrained
from capvst.model.checkpoint import UNTRAINED


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name,mode", [("photorealistic-seed0", "photorealistic"),
                                       ("artistic-seed1", "artistic")])
def test_reference_weights_load_strict(reference, name, mode):
    path = reference / "weights" / f"{name}.pt"
    m = load_file(path, mode)
    data = path.read_bytes()
    assert m.model_id == hashlib.sha256(data).hexdigest()[:12]
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert not m.net.training
    # the untrained fallback is exactly these seeded weights
    ref = untrained(mode).net.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in m.net.state_dict().items())


def test_untrained_is_reproducible_and_labelled():
    a, b = untrained("artistic"), untrained("artistic")
    assert a.model_id == UNTRAINED
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters()))


def test_module_prefix_is_unwrapped():
    sd = untrained("photorealistic").net.state_dict()
    m = load_bytes(_bytes({"state_dict": {f"module.{k}": v for k, v in sd.items()}}),
                   "photorealistic")
    assert torch.equal(m.net.state_dict()["stack.0.conv.1.weight"], sd["stack.0.conv.1.weight"])
    # a bare state dict (no wrapper) loads too
    load_bytes(_bytes(sd), "photorealistic")


def test_other_network_refused_with_advice():
    sd = dict(untrained("photorealistic").net.state_dict())
    sd.pop("stack.3.conv.4.bias")
    sd["head.weight"] = torch.zeros(3)
    sd["stack.0.conv.1.weight"] = torch.zeros(4, 8, 3, 3)
    with pytest.raises(CheckpointError) as e:
        load_bytes(_bytes({"state_dict": sd}), "photorealistic")
    msg = str(e.value)
    assert "1 missing" in msg and "1 unexpected" in msg and "another shape" in msg
    assert "released" in msg


def test_not_a_checkpoint():
    for data in (b"", os.urandom(256), b"PK\x03\x04broken zip"):
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
            load_bytes(data, "photorealistic")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_bytes(_bytes([1, 2, 3]), "photorealistic")
    with pytest.raises(CheckpointError, match="not found"):
        load_file("/nonexistent/ckpt.pt", "photorealistic")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    data = _bytes({"state_dict": {"x": _Evil(str(marker))}})
    with pytest.raises(CheckpointError, match="refused, nothing executed"):
        load_bytes(data, "photorealistic")
    assert not marker.exists()


def test_saved_mode_metadata_is_enforced(tmp_path):
    net = untrained("artistic").net
    path = tmp_path / "mine.pt"
    model_id = save_checkpoint(net, "artistic", path)
    assert load_file(path, "artistic").model_id == model_id
    with pytest.raises(CheckpointError, match="saved for mode 'artistic'"):
        load_file(path, "photorealistic")


def test_sha256_pin(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(untrained("photorealistic").net, "photorealistic", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_file(path, "photorealistic", expected_sha256=digest.upper()).sha256 == digest
    with pytest.raises(CheckpointError, match="expected"):
        load_file(path, "photorealistic", expected_sha256="0" * 64)


def test_regenerated_reference_weights_equal_the_original_files():
    """The seeded untrained networks are the reference weights, tensor for tensor."""
    import json

    from tests.refdata import REFERENCE, WEIGHTS, state_dict_digest

    recorded = json.loads((REFERENCE / "weights.sha256.json").read_text())
    for name, mode in WEIGHTS.items():
        assert state_dict_digest(untrained(mode).net.state_dict()) == recorded[name], name
