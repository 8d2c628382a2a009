"""fedssl from Python (fedssl.simulate / centralized / evaluate / embed / load_encoder,
run_config, parse_run_config) and `init-weights`: a run that starts from a torchvision
state_dict, a safetensors file or a fedssl export, and one-line errors for weights that do
not fit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fedssl
from fedssl.client.app import app as client_app
from fedssl.common.augment import normalize
from fedssl.common.checkpoint import load_init_weights, save_weights
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.datasets import DataError, load_images
from fedssl.common.methods import build_method
from fedssl.common.records import from_record
from fedssl.server.app import run_federation
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.server.run_dir import RunDir, summarize, weights_metadata
from fedssl.simulations.cli import main
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config


def cifar_resnet18() -> nn.Module:
    """torchvision's resnet18 with the CIFAR stem, built as common/encoders.py builds it;
    its ImageNet classifier `fc` is kept, as in any torchvision model's state_dict."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@pytest.fixture(scope="module")
def trained_resnet18(small_image_folder, tmp_path_factory) -> Path:
    """A CIFAR-stem resnet18 trained for a few supervised steps on the test images (its kNN
    top-1 on them is 1.0 where a random one's is 0.25), saved with torch.save as a
    torchvision user saves one."""
    torch.manual_seed(7)
    data = load_images("imagefolder", str(small_image_folder), 16)
    net = cifar_resnet18().train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(normalize(data.images)), data.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # BatchNorm statistics of the trained network, not the first steps' mix of old and new
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        net(normalize(data.images))
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------- init-weights


def test_a_torchvision_state_dict_initialises_the_federated_run(trained_resnet18, small_image_folder,
                                                                tmp_path):
    saved = torch.load(trained_resnet18, weights_only=True)
    cfg = fast_config(small_image_folder, tmp_path / "init", encoder="resnet18", num_rounds=1,
                      init_weights=str(trained_resnet18))
    grid = InProcessGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)
    # the global model sent to the sites in round 1 is the saved one, classifier aside
    sent = from_record(grid.sent[0].content["arrays"])
    assert all(torch.equal(sent["encoder." + k], v.to(sent["encoder." + k].dtype))
               for k, v in saved.items() if not k.startswith("fc."))
    assert not any(k.startswith("encoder.fc") for k in sent)
    # round 0 evaluated those weights: the server's own evaluation of them, not a fresh model's
    method = build_method(cfg)
    method.encoder.load_state_dict({k: v for k, v in saved.items() if not k.startswith("fc.")})
    loaded = GlobalEvaluator(cfg, torch.device("cpu"))(method)
    assert rows(tmp_path / "init")[0]["knn_top1"] == loaded["knn_top1"]
    assert rows(tmp_path / "init")[0]["collapse_std"] == loaded["collapse_std"]

    random_init = fast_config(small_image_folder, tmp_path / "random", encoder="resnet18", num_rounds=1)
    run_federation(InProcessGrid(client_app, num_nodes=2), random_init)
    assert rows(tmp_path / "random")[0]["knn_top1"] != rows(tmp_path / "init")[0]["knn_top1"]

    # the centralized baseline starts from the same weights (and the Python API runs it)
    summary = fedssl.centralized(cfg, out_dir=str(tmp_path / "central"))
    assert summary["initial"]["knn_top1"] == loaded["knn_top1"]
    assert summary["config"]["init-weights"] == str(trained_resnet18)


def test_a_fedssl_checkpoint_loads_encoder_and_heads_and_an_export_the_encoder(tmp_path):
    cfg = RunConfig(proj_dim=16, hidden_dim=32)
    source = build_method(cfg)
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.uniform_(-1, 1)
    checkpoint = tmp_path / "checkpoint.safetensors"
    # a run's checkpoint also holds the strategy's server state: not model weights
    save_weights(checkpoint, {**source.shared_state(), "server-state/momentum/x": torch.ones(3)}, {})
    target_cfg = cfg.replace(seed=1, init_weights=str(checkpoint))
    target = build_method(target_cfg)
    assert not torch.equal(target.shared_state()["encoder.conv1.weight"],
                           source.shared_state()["encoder.conv1.weight"])
    assert load_init_weights(target, target_cfg) == len(source.shared_state())
    for key, value in source.shared_state().items():  # encoder, projector and predictor
        assert torch.equal(target.shared_state()[key], value), key

    out = RunDir(tmp_path / "run")
    summary = summarize(cfg, [{"round": 1, "knn_top1": 0.5}], seconds=1.0, encoder=out.encoder_dir,
                        out_dir=out.path, rounds=1)
    folder = out.export_encoder(source.shared_state(), weights_metadata(cfg, 1), summary)
    simsiam_cfg = RunConfig(method="simsiam", proj_dim=16, hidden_dim=32, init_weights=str(folder))
    simsiam = build_method(simsiam_cfg)
    projector = {k: v.clone() for k, v in simsiam.projector.state_dict().items()}
    load_init_weights(simsiam, simsiam_cfg)
    assert all(torch.equal(v, source.encoder.state_dict()[k])
               for k, v in simsiam.encoder.state_dict().items())
    assert all(torch.equal(v, projector[k]) for k, v in simsiam.projector.state_dict().items())


def test_weights_that_do_not_fit_are_one_line_naming_each_key(trained_resnet18, tmp_path):
    # resnet18's extra blocks in a resnet10: every one named or counted, the classifier skipped
    cfg = RunConfig(encoder="resnet10", init_weights=str(trained_resnet18))
    with pytest.raises(ConfigError) as err:
        load_init_weights(build_method(cfg), cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"init-weights={str(trained_resnet18)!r} does not fit")
    assert "0 missing, 48 unexpected, 0 of another shape (48 in all)" in message
    assert "unexpected layer1.1.bn1.bias" in message and "; and 36 more" in message
    assert "fc." not in message

    # torchvision's ImageNet stem where this run has the CIFAR one
    imagenet = tmp_path / "imagenet-stem.pt"
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    cfg = RunConfig(encoder="resnet18", init_weights=str(imagenet))
    with pytest.raises(ConfigError, match=r"1 of another shape \(1 in all\): conv1.weight has shape "
                                          r"\[64, 3, 7, 7\], the model \[64, 3, 3, 3\]$"):
        load_init_weights(build_method(cfg), cfg)


@pytest.mark.parametrize("make, fragment", [
    (lambda tmp: tmp / "none.pth", "no such file or folder"),
    (lambda tmp: tmp, "the folder holds no model.safetensors"),
    (lambda tmp: (tmp / "list.pt", torch.save([torch.ones(2)], tmp / "list.pt"))[0], "holds no state_dict"),
    (lambda tmp: (tmp / "torn.safetensors", (tmp / "torn.safetensors").write_bytes(b"\x00" * 20))[0],
     "cannot be read as weights"),
])
def test_an_unreadable_init_weights_is_one_line(tmp_path, make, fragment):
    cfg = RunConfig(init_weights=str(make(tmp_path)))
    with pytest.raises(ConfigError) as err:
        load_init_weights(build_method(cfg), cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_init_weights_is_checked_by_its_form_and_before_a_run_starts(trained_resnet18, small_image_folder,
                                                                     tmp_path):
    with pytest.raises(ConfigError, match="init-weights='w.ckpt' is invalid: must be empty, a .pth"):
        RunConfig(init_weights="w.ckpt").validate()
    for fine in ("", "w.pth", "w.pt", "runs/a/encoder", "runs/a/encoder/model.safetensors"):
        RunConfig(init_weights=fine).validate()  # a client checks the form without the file
    with pytest.raises(ConfigError, match="does not fit encoder='resnet10'"):
        fedssl.centralized(fast_config(small_image_folder, tmp_path / "run"),
                           init_weights=str(trained_resnet18))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------- the Python API


def test_importing_fedssl_leaves_torch_for_later():
    """The `fedssl` command imports the package for its settings: `fedssl --help` and the
    deployment commands must not pay for torch."""
    code = ("import sys, fedssl, fedssl.preflight; assert 'torch' not in sys.modules; "
            "fedssl.load_encoder; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_run_config_takes_underscored_keywords_over_a_mapping():
    cfg = fedssl.run_config({"num-rounds": 7, "method": "simsiam"}, num_rounds=3, batch_size="16")
    assert (cfg.num_rounds, cfg.method, cfg.batch_size) == (3, "simsiam", 16)
    assert fedssl.run_config(cfg, lr=0.1).replace(lr=cfg.lr) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'num-round' \\(did you mean 'num-rounds'"):
        fedssl.run_config(num_round=3)


def test_parse_run_config_reads_flwr_run_syntax(tmp_path):
    parsed = fedssl.parse_run_config('num-rounds=3 lr=0.1 amp=false method="simsiam" out-dir="/tmp/a b"')
    assert parsed == {"num-rounds": 3, "lr": 0.1, "amp": False, "method": "simsiam", "out-dir": "/tmp/a b"}
    assert fedssl.parse_run_config(["num-rounds=3", "seed=2"]) == {"num-rounds": 3, "seed": 2}
    (tmp_path / "run.toml").write_text('method = "byol"\nnum-rounds = 4\n')
    assert fedssl.parse_run_config(str(tmp_path / "run.toml")) == {"method": "byol", "num-rounds": 4}
    assert fedssl.run_config(parsed).num_rounds == 3
    with pytest.raises(ConfigError, match="values are TOML") as err:
        fedssl.parse_run_config("method=simsiam")  # flwr run wants strings quoted too
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    cfg = RunConfig(image_size=16, proj_dim=16, hidden_dim=32)
    out = RunDir(tmp_path_factory.mktemp("run") / "run")
    summary = summarize(cfg, [{"round": 1, "knn_top1": 0.5}], seconds=1.0, encoder=out.encoder_dir,
                        out_dir=out.path, rounds=1)
    return out.export_encoder(build_method(cfg).shared_state(), weights_metadata(cfg, 1), summary)


def test_evaluate_and_embed_from_python_match_the_cli(export_folder, small_image_folder, tmp_path, capsys):
    scores = fedssl.evaluate(export_folder, data_path=str(small_image_folder), knn_k=5, threads=1)
    assert main(["evaluate", str(export_folder), "--data-path", str(small_image_folder), "--knn-k", "5",
                 "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(scores))
    assert scores["classes"] == 4 and 0.0 <= scores["knn_top1"] <= 1.0

    result = fedssl.embed(export_folder, small_image_folder, tmp_path / "f.npy", threads=1)
    assert (result["images"], result["dim"]) == (24, 512)
    with pytest.raises(DataError, match="labels-fraction 2 is not allowed"):
        fedssl.evaluate(export_folder, data_path=str(small_image_folder), labels_fraction=2)
    with pytest.raises(DataError, match="does not exist"):
        fedssl.load_encoder(tmp_path / "missing")


@pytest.mark.engine
def test_simulate_from_python_on_the_ray_engine(small_image_folder, tmp_path):
    summary = fedssl.simulate(num_clients=2, client_cpus=1, dataset="imagefolder",
                              data_path=str(small_image_folder), eval_path=str(small_image_folder),
                              image_size=16, num_rounds=1, fraction_train=1.0, batch_size=4,
                              proj_dim=16, hidden_dim=32, knn_k=5, probe=False, threads=1,
                              out_dir=str(tmp_path / "run"))
    assert summary["final"]["round"] == 1 and summary["final"]["clients_ok"] == 2
    assert summary["encoder"] == str(tmp_path / "run" / "encoder")
    assert fedssl.load_encoder(summary["encoder"])(torch.rand(1, 3, 16, 16)).shape == (1, 512)
