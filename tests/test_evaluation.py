"""Behaviour of the SSL monitors (common/evaluation.py) and of the server's evaluation of
the global model (server/evaluation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fedssl.common.augment import normalize
from fedssl.common.device import autocast
from fedssl.common.evaluation import collapse_std, embed, knn_top1, linear_probe


def _clusters(n: int, num_classes: int, dim: int, noise: float, seed: int):
    """Points around well-separated random class centres, with their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    features = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return features, labels


# ----------------------------------------------------------------------- kNN


def test_knn_is_perfect_on_separated_clusters():
    bank, bank_labels = _clusters(500, 10, 32, noise=0.05, seed=0)
    query, query_labels = _clusters(300, 10, 32, noise=0.05, seed=1)
    assert knn_top1(bank, bank_labels, query, query_labels) == 1.0


def test_knn_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    bank_labels = torch.randint(0, 10, (2000,), generator=g)
    query_labels = torch.randint(0, 10, (2000,), generator=g)
    accuracy = knn_top1(bank, bank_labels, query, query_labels, num_classes=10)
    assert abs(accuracy - 0.1) < 0.04


def test_knn_with_k_larger_than_the_bank():
    bank, bank_labels = _clusters(6, 2, 8, noise=0.01, seed=0)
    query, query_labels = _clusters(50, 2, 8, noise=0.01, seed=1)
    assert knn_top1(bank, bank_labels, query, query_labels, k=200) == 1.0


def test_knn_uses_cosine_similarity():
    # Scaling features changes no cosine similarity, hence no prediction.
    bank, bank_labels = _clusters(200, 5, 16, noise=1.0, seed=0)
    query, query_labels = _clusters(200, 5, 16, noise=1.0, seed=1)
    scale = torch.rand(200, 1) * 10 + 0.1
    assert knn_top1(bank, bank_labels, query, query_labels) == knn_top1(
        bank * scale, bank_labels, query * scale, query_labels
    )


def test_knn_chunking_does_not_change_the_result():
    bank, bank_labels = _clusters(300, 5, 16, noise=1.5, seed=0)
    query, query_labels = _clusters(257, 5, 16, noise=1.5, seed=1)
    whole = knn_top1(bank, bank_labels, query, query_labels, k=20)
    chunked = knn_top1(bank, bank_labels, query, query_labels, k=20, chunk=7)
    assert whole == chunked
    assert 0.0 < whole < 1.0


# ------------------------------------------------------------------ collapse


def test_collapse_std_of_random_features_is_one_over_sqrt_dim():
    dim = 128
    features = torch.randn(4096, dim, generator=torch.Generator().manual_seed(0))
    assert collapse_std(features) == pytest.approx(1 / math.sqrt(dim), rel=0.05)


def test_collapse_std_of_identical_features_is_zero():
    features = torch.randn(1, 64).expand(100, -1)
    assert collapse_std(features) < 1e-6


# -------------------------------------------------------------- linear probe


def _separable(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    features = torch.randn(n, 16, generator=g) * 3 + 5  # not standardised on purpose
    return features, ((features - 5) @ weights).argmax(dim=1)


def test_linear_probe_learns_linearly_separable_features():
    train_x, train_y = _separable(600, seed=0)
    test_x, test_y = _separable(500, seed=1)
    assert linear_probe(train_x, train_y, test_x, test_y, epochs=20) > 0.9


def test_linear_probe_is_deterministic_for_a_seed():
    train_x, train_y = _separable(400, seed=0)
    test_x, test_y = _separable(300, seed=1)
    train_y = torch.where(torch.rand(400) < 0.3, torch.randint(0, 4, (400,)), train_y)  # noise
    first = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, seed=3)
    second = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, seed=3)
    assert first == second


# --------------------------------------------------------------------- embed


class _Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.dropout = torch.nn.Dropout(0.5)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.pool(torch.relu(self.bn(self.conv(x))))).flatten(1)


def _uint8_images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


def test_embed_returns_float_features_in_eval_mode():
    torch.manual_seed(0)
    encoder = _Encoder()
    images = _uint8_images(10)
    features = embed(encoder, images, batch_size=4)

    assert features.shape == (10, 8)
    assert features.dtype == torch.float32
    assert features.device.type == "cpu"
    encoder.eval()  # eval mode: deterministic, running statistics, no dropout
    # in the precision training uses: bf16 autocast where this CPU runs it natively
    with torch.no_grad(), autocast(torch.device("cpu"), model=encoder):
        expected = encoder(normalize(images)).float()
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_embed_restores_training_mode_of_every_submodule():
    encoder = _Encoder().train()
    encoder.bn.eval()  # a frozen submodule must stay frozen
    running_mean = encoder.bn.running_mean.clone()
    embed(encoder, _uint8_images(6))
    assert encoder.training and encoder.conv.training and encoder.dropout.training
    assert not encoder.bn.training
    assert torch.equal(encoder.bn.running_mean, running_mean)  # eval: statistics untouched


def test_embed_keeps_eval_mode():
    encoder = _Encoder().eval()
    embed(encoder, _uint8_images(3))
    assert not any(module.training for module in encoder.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embed_on_cuda_returns_cpu_float32():
    encoder = _Encoder().cuda()
    features = embed(encoder, _uint8_images(10), batch_size=4, device="cuda")
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert features.shape == (10, 8)


# ------------------------------------------------- a model that gives NaN/Inf features


def test_monitors_refuse_non_finite_features_rather_than_score_them():
    bank, bank_labels = _clusters(200, 4, 16, noise=0.1, seed=0)
    query, query_labels = _clusters(100, 4, 16, noise=0.1, seed=1)
    broken = query.clone()
    broken[3, 0] = float("nan")
    broken[7, 5] = float("inf")
    with pytest.raises(ValueError, match=r"knn_top1: query_features holds NaN/Inf in 2 of 100"):
        knn_top1(bank, bank_labels, broken, query_labels)
    with pytest.raises(ValueError, match=r"collapse_std: .*NaN/Inf"):
        collapse_std(broken)
    with pytest.raises(ValueError, match=r"linear_probe: test_features .*NaN/Inf"):
        linear_probe(bank, bank_labels, broken, query_labels, epochs=1)


def _first_batchnorm(module: torch.nn.Module) -> torch.nn.modules.batchnorm._BatchNorm:
    return next(m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_the_server_marks_a_model_with_a_negative_running_variance_and_stops(
        small_image_folder, tmp_path, fedssl_log):
    from fedssl.common.methods import build_method
    from fedssl.server.evaluation import GlobalEvaluator
    from conftest import fast_config

    cfg = fast_config(small_image_folder, tmp_path / "run")
    evaluator = GlobalEvaluator(cfg, torch.device("cpu"))
    method = build_method(cfg)
    healthy = evaluator(method, probe=True)
    assert healthy["finite"] is True and 0.0 <= healthy["knn_top1"] <= 1.0
    assert math.isfinite(healthy["collapse_std"]) and math.isfinite(healthy["probe_top1"])

    # what a server optimizer's step did to BatchNorm: a variance below zero
    _first_batchnorm(method.encoder).running_var[0] = -0.5
    scores = evaluator(method, probe=True)
    assert scores["finite"] is False
    assert scores["knn_top1"] is None and scores["collapse_std"] is None and scores["probe_top1"] is None
    assert scores["nonfinite"]["bank"] == len(evaluator.bank)  # every image's feature is NaN

    from fedssl.server.evaluation import stop_if_not_finite
    stop_if_not_finite(healthy, 3)  # a finite model goes on
    with pytest.raises(RuntimeError, match="round 3: .*non-finite"):
        stop_if_not_finite(scores, 3)
    assert "round 3: the global model gives non-finite features" in fedssl_log.text


def test_a_run_whose_global_model_turns_non_finite_records_the_round_and_stops(
        small_image_folder, tmp_path, fedssl_log):
    import json

    from flwr.app import Array, ArrayRecord

    from fedssl.client.app import app as client_app
    from fedssl.server.app import run_federation
    from fedssl.simulations.inprocess_grid import InProcessGrid
    from conftest import fast_config

    def negative_variances(msg, context):
        """The real client, whose reply's BatchNorm variances are all below zero."""
        reply = client_app(msg, context)
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({
            k: Array(-v.numpy() - 1.0) if k.endswith("running_var") else v for k, v in arrays.items()})
        return reply

    cfg = fast_config(small_image_folder, tmp_path / "run", num_rounds=3)
    with pytest.raises(RuntimeError, match="round 1: "):
        run_federation(InProcessGrid(negative_variances, num_nodes=2), cfg)
    assert "round 1: the global model gives non-finite features" in fedssl_log.text

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1]  # stopped after the round it could not measure
    assert rows[0]["finite"] is True and rows[0]["knn_top1"] is not None
    assert rows[1]["finite"] is False and rows[1]["clients_ok"] == 2
    assert rows[1]["knn_top1"] is None and rows[1]["collapse_std"] is None
    assert not (tmp_path / "run" / "encoder.safetensors").exists()  # nothing exported
