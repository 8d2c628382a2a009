"""Weights cross the wire and the disk unchanged; the exported encoder loads in torchvision."""
import json

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, ResNet

from fedssl.common import checkpoint
from fedssl.common.checkpoint import export_encoder, load_encoder, load_weights, read_metadata, save_weights
from fedssl.common.config import RunConfig
from fedssl.common.methods import build_method
from fedssl.common.records import from_record, to_record


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_record_round_trip_is_bit_exact(method):
    state = build_method(RunConfig(method=method, proj_dim=16, hidden_dim=32)).state_dict()
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype
        assert torch.equal(back[key], state[key]), key


def test_checkpoint_write_is_atomic_and_keeps_metadata(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_weights(path, {"w": torch.ones(2)}, {"round": 1})

    def torn_write(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, {"w": torch.zeros(2)}, {"round": 2})
    state, meta = load_weights(path)
    assert meta == {"round": 1} and torch.equal(state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp left


def _torchvision_model(encoder: str) -> nn.Module:
    """What a downstream user writes: torchvision's model with the documented stem change."""
    if encoder.startswith("resnet"):
        net = models.resnet18() if encoder == "resnet18" else ResNet(BasicBlock, [1, 1, 1, 1])
        net.conv1 = nn.Conv2d(3, 64, 3, 1 if encoder == "resnet18" else 2, 1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
    else:
        net = models.mobilenet_v3_small()
        net.features[0][0].stride = (1, 1)
        net.classifier = nn.Identity()
    return net


@pytest.mark.parametrize("encoder", ["mobilenet_v3_small", "resnet18", "resnet10"])
def test_exported_encoder_loads_into_plain_torchvision(tmp_path, encoder):
    cfg = RunConfig(encoder=encoder, proj_dim=16, hidden_dim=32)
    method = build_method(cfg)
    path = tmp_path / "encoder.safetensors"
    export_encoder(path, method.shared_state(), {"encoder": encoder, "image-size": 32})
    net = _torchvision_model(encoder)
    net.load_state_dict(load_weights(path)[0])  # strict: every key matches torchvision's
    x = torch.randn(2, 3, 32, 32)
    method.encoder.eval(), net.eval()
    assert torch.allclose(net(x), method.encoder(x), atol=1e-5)
    assert torch.allclose(load_encoder(path).eval()(x), net(x), atol=1e-5)
    assert json.loads((tmp_path / "encoder.json").read_text())["encoder"] == encoder
    assert read_metadata(path)["image-size"] == 32
