"""transfer-dtype = float16: float arrays travel narrowed both ways (the server's model down,
each client's change up), integer buffers as they are; the server widens the replies before
screening and aggregation and keeps its model, checkpoint and exported encoder in float32."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file

from fedssl.client.app import app as client_app
from fedssl.common.config import ConfigError, RunConfig
from fedssl.common.methods import build_method
from fedssl.common.records import decode_update, encode_update, narrow, to_record, widen
from fedssl.server.app import run_federation
from fedssl.server.resume import load_run_state
from fedssl.server.strategies import build_strategy
from fedssl.server.npy_view import as_numpy
from fedssl.simulations.inprocess_grid import InProcessGrid
from conftest import fast_config

SMALL = dict(proj_dim=32, hidden_dim=64, image_size=16)


def global_model() -> ArrayRecord:
    return to_record(build_method(RunConfig(**SMALL)).shared_state())


def float_keys(record: ArrayRecord) -> list[str]:
    return [k for k, v in record.items() if np.dtype(v.dtype).kind == "f"]


def dtypes(record: ArrayRecord) -> dict[str, str]:
    return {k: v.dtype for k, v in record.items()}


def test_narrow_sends_floats_in_fp16_and_leaves_integer_buffers_alone():
    model = global_model()
    sent = narrow(model, float_keys(model), np.dtype(np.float16))
    counters = [k for k in model if k not in float_keys(model)]
    assert counters, "the model should hold BatchNorm step counters"
    for key in float_keys(model):
        assert sent[key].dtype == "float16"
        np.testing.assert_allclose(sent[key].numpy(), model[key].numpy(), rtol=2 ** -11, atol=2 ** -24)
    for key in counters:
        assert sent[key].dtype == model[key].dtype and sent[key].data == model[key].data
    assert set(dtypes(widen(sent)).values()) == set(dtypes(model).values())


def test_a_change_survives_the_round_trip_to_fp16_precision_of_the_change():
    model = global_model()
    sent = narrow(model, float_keys(model), np.dtype(np.float16))
    received = as_numpy(widen(sent))  # what the client trains from
    rng = np.random.default_rng(0)
    change = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
              for k, v in received.items() if v.dtype.kind == "f"}
    trained = {k: v + change[k] if k in change else v + 7 for k, v in received.items()}
    reply = encode_update(ArrayRecord({k: Array(np.asarray(v)) for k, v in trained.items()}), sent)

    for key in float_keys(model):
        assert reply[key].dtype == "float16"
    decoded = as_numpy(decode_update(reply, as_numpy(model)))
    glob = as_numpy(model)
    for key, value in decoded.items():
        assert value.dtype == glob[key].dtype, key
        if key in change:
            # the change the client made, laid onto the server's float32 model
            np.testing.assert_allclose(value - glob[key], change[key], rtol=2 ** -10, atol=1e-7)
        else:
            assert (value == glob[key] + 7).all(), "integer buffers travel exactly"


def test_fp16_transfer_halves_the_bytes_each_way():
    model = global_model()
    sent = narrow(model, float_keys(model), np.dtype(np.float16))
    reply = encode_update(widen(sent), sent)
    for record in (sent, reply):
        assert 0.49 < record.count_bytes() / model.count_bytes() < 0.52


def test_a_narrow_array_without_a_matching_reference_stays_narrow_for_screening():
    model = global_model()
    key = float_keys(model)[0]
    bad = ArrayRecord({key: Array(np.zeros(3, np.float16))})
    assert decode_update(bad, as_numpy(model))[key].dtype == "float16"


def test_transfer_dtype_is_validated_in_one_line():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"transfer-dtype": "bfloat16"})
    message = str(err.value)
    assert "transfer-dtype='bfloat16'" in message and "float32, float16" in message
    assert "\n" not in message


@pytest.mark.parametrize("changes", [dict(dp="fixed", max_update_norm_ratio=0.0),
                                     dict(secure_aggregation=True, max_update_norm_ratio=0.0)])
def test_fp16_transfer_is_refused_with_dp_and_secure_aggregation(changes):
    with pytest.raises(ConfigError, match="transfer-dtype='float16' is invalid with"):
        build_strategy(RunConfig(transfer_dtype="float16", **changes))


class RecordingGrid(InProcessGrid):
    """Notes the dtypes of the arrays each message carries, as they travel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down: list[dict[str, str]] = []
        self.up: list[dict[str, str]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += [dtypes(m.content["arrays"]) for m in messages]
        replies = super().send_and_receive(messages, timeout=timeout)
        self.up += [dtypes(r.content["arrays"]) for r in replies if r.has_content()]
        return replies


def test_a_run_with_fp16_transfer_trains_and_keeps_its_model_in_fp32(small_image_folder, tmp_path):
    out = tmp_path / "run"
    cfg = fast_config(small_image_folder, out, num_rounds=2, transfer_dtype="float16")
    grid = RecordingGrid(client_app, num_nodes=2)
    run_federation(grid, cfg)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["aggregated"] and r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows[1:])
    wide = to_record(build_method(cfg).shared_state())
    for row in rows[1:]:
        assert 0.49 < row["bytes_sent"] / (2 * wide.count_bytes()) < 0.52
        assert 0.49 < row["bytes_received"] / (2 * wide.count_bytes()) < 0.52

    floats = set(float_keys(wide))
    assert len(grid.down) == len(grid.up) == 4
    for travelled in grid.down + grid.up:
        assert {travelled[k] for k in floats} == {"float16"}
        # step counters as they are (FedAvg's float64 copies of them too), never narrowed
        assert "float16" not in {d for k, d in travelled.items() if k not in floats}
    assert all(up[k] == "int64" for up in grid.up for k in up if k not in floats)

    checkpoint = load_run_state(out / "checkpoint.safetensors").shared
    assert {str(checkpoint[k].dtype) for k in floats} == {"torch.float32"}
    encoder = load_file(out / "encoder.safetensors")
    assert {v.dtype for v in encoder.values() if v.dtype.kind == "f"} == {np.dtype(np.float32)}
