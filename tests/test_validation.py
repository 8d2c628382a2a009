"""The update validator: property-based (hypothesis) over random models and corruptions."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import given, settings, strategies as st

from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedssl.server.mean import BLOCK, BlockWalker, WeightedMean
from fedssl.server.validation import norm_outliers, screen, spec_of, update_norm
from fedssl.simulations.inprocess_grid import InProcessGrid

RATIO = 10.0
DTYPES = st.sampled_from([np.float32, np.float64, np.int64])
KEYS = st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,6}){0,2}", fullmatch=True),
                min_size=1, max_size=5, unique=True)
SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
FAST = settings(max_examples=60, deadline=None)


@st.composite
def models(draw) -> dict[str, np.ndarray]:
    """A global model: named arrays of random shapes and dtypes, at least one floating."""
    keys = draw(KEYS)
    model = {k: np.full(draw(SHAPES), draw(st.integers(-3, 3)), dtype=draw(DTYPES)) for k in keys}
    model[keys[0]] = np.asarray(model[keys[0]], dtype=np.float32)
    return model


def nudged(model: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    """A client's update: every floating array moved by a random step of norm `scale`."""
    rng = np.random.default_rng(seed)
    out = {}
    floats = [k for k, v in model.items() if v.dtype.kind == "f"]
    steps = {k: rng.standard_normal(model[k].shape) for k in floats}
    total = np.sqrt(sum(float((s ** 2).sum()) for s in steps.values())) or 1.0
    for key, value in model.items():
        step = steps[key] * scale / total if key in steps else 0
        out[key] = np.asarray(value + step, dtype=value.dtype)
    return out


def reply(node: int, arrays: dict[str, np.ndarray], **metrics) -> Message:
    request = Message(RecordDict(), node, "train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5, **metrics})})
    return Message(content, reply_to=request)


def setup_module():
    InProcessGrid(lambda m, c: m, num_nodes=1)  # messages need the process's task identity


@FAST
@given(model=models(), scales=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_honest_replies_are_all_accepted(model, scales, seed):
    # honest sites differ, but by less than the bound (half of it: float32 rounding)
    scales = [max(s, 2 * max(scales) / RATIO) for s in scales]
    replies = [reply(i, nudged(model, s, seed + i)) for i, s in enumerate(scales)]
    result = screen(replies, spec_of(model), model, RATIO)
    assert result.rejected == {}
    assert len(result.accepted) == len(replies)


CORRUPTIONS = ["drop", "extra", "shape", "dtype", "nan", "inf", "huge", "weight", "error", "metric"]


@FAST
@given(model=models(), corruption=st.sampled_from(CORRUPTIONS), honest=st.integers(2, 5),
       seed=st.integers(0, 99))
def test_one_corrupted_reply_is_rejected_with_a_reason_and_the_rest_kept(model, corruption, honest, seed):
    good = [reply(i, nudged(model, 0.1, seed + i)) for i in range(honest)]
    bad_arrays = nudged(model, 0.1, seed + 99)
    key = next(iter(model))  # a floating-point array
    metrics = {}
    expected = key
    if corruption == "drop":
        del bad_arrays[key]
    elif corruption == "extra":
        bad_arrays["zz.extra"] = np.zeros(2, np.float32)
        expected = "zz.extra"
    elif corruption == "shape":
        bad_arrays[key] = np.zeros(model[key].shape + (2,), np.float32)
    elif corruption == "dtype":
        bad_arrays[key] = bad_arrays[key].astype(np.float16)
    elif corruption in ("nan", "inf"):
        bad_arrays[key] = bad_arrays[key].copy()
        bad_arrays[key].flat[0] = np.nan if corruption == "nan" else np.inf
        expected = "NaN or Inf"
    elif corruption == "huge":
        bad_arrays = nudged(model, 0.1 * RATIO * 50, seed)
        expected = "update norm"
    elif corruption == "weight":
        metrics = {"num-examples": 0}
        expected = "num-examples"
    elif corruption == "metric":
        metrics = {"train-loss": float("nan")}
        expected = "train-loss"
    bad = reply(77, bad_arrays, **metrics)
    if corruption == "error":
        bad = Message(Error(code=0, reason="disk on fire"), reply_to=Message(RecordDict(), 77, "train"))
        expected = "disk on fire"

    result = screen([*good, bad], spec_of(model), model, RATIO)
    assert set(result.rejected) == {77}
    assert expected in result.rejected[77] and "\n" not in result.rejected[77]
    assert [m.metadata.src_node_id for m in result.accepted] == list(range(honest))


@FAST
@given(model=models(), extra_metric=st.booleans(), seed=st.integers(0, 99))
def test_a_reply_with_other_metric_keys_than_the_rest_is_rejected(model, extra_metric, seed):
    odd = {"surprise": 1.0} if extra_metric else {}
    replies = [reply(i, nudged(model, 0.1, seed + i)) for i in range(3)]
    replies.append(reply(9, nudged(model, 0.1, seed), **odd) if odd else
                   Message(RecordDict({"arrays": replies[0].content["arrays"],
                                       "metrics": MetricRecord({"num-examples": 3})}),
                           reply_to=Message(RecordDict(), 9, "train")))
    result = screen(replies, spec_of(model), model, RATIO)
    assert set(result.rejected) == {9} and "differ from the other replies" in result.rejected[9]


@FAST
@given(model=models(), weights=st.lists(st.integers(1, 5000), min_size=2, max_size=5),
       corruption=st.sampled_from(["none", "huge", "enormous", "metric-keys", "nan"]), seed=st.integers(0, 99))
def test_the_mean_summed_while_screening_is_flowers_fedavg_of_the_accepted(model, weights, corruption, seed):
    replies = [reply(i, nudged(model, 0.1, seed + i), **{"num-examples": w}) for i, w in enumerate(weights)]
    bad = {"huge": reply(9, nudged(model, 0.1 * RATIO * 50, seed)),
           "enormous": reply(9, {k: np.full_like(v, 1e30) if v.dtype.kind == "f" else v for k, v in model.items()}),
           "metric-keys": reply(9, nudged(model, 0.1, seed), surprise=1.0),
           "nan": reply(9, {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in model.items()})}
    if corruption in bad:  # some are added to the sum before they are found out
        replies.append(bad[corruption])
    mean = WeightedMean()
    result = screen(replies, spec_of(model), model, RATIO, mean)
    assert set(result.rejected) == ({9} if corruption in bad else set())

    expected = aggregate_arrayrecords([m.content for m in result.accepted], "num-examples")
    got = mean.result()
    assert got.keys() == model.keys()
    for key, value in expected.items():
        assert got[key].dtype == model[key].dtype  # integer buffers stay integers
        want = value.numpy()
        if model[key].dtype.kind == "f":
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(got[key], np.rint(want).astype(model[key].dtype))


@FAST
@given(pairs=st.lists(st.tuples(st.floats(1e-3, 1e3), st.integers(1, 100)), min_size=1, max_size=9),
       ratio=st.floats(1.0, 100.0))
def test_norm_outliers_are_exactly_those_above_ratio_times_lower_median_per_step(pairs, ratio):
    norms = {i: norm for i, (norm, _) in enumerate(pairs)}
    steps = {i: k for i, (_, k) in enumerate(pairs)}
    per_step = [norm / k for norm, k in pairs]
    median = sorted(per_step)[(len(per_step) - 1) // 2]
    rejected = norm_outliers(norms, ratio, steps)
    assert set(rejected) == {i for i, per in enumerate(per_step) if per > ratio * median}
    # the median reply itself, and at least half of them, always pass
    assert len(rejected) <= len(pairs) // 2
    assert set(norm_outliers(norms, ratio)) == {i for i, n in norms.items() if n > ratio * sorted(norms.values())[
        (len(norms) - 1) // 2]}  # without steps: whole norms


def test_a_large_honest_site_beside_a_small_one_is_kept_and_a_huge_update_is_not():
    # The two norms of a round the Dirichlet(0.1) sweep lost (0.374 and 4.667), sent by sites
    # of sizes that partition holds: 36 images (1 step of batch 36) and 2,000 (31 steps of 64).
    # Whole norms reject the larger honest site; per step it stays, and 100 times its update
    # is still refused.
    model = {"w": np.zeros(64, dtype=np.float32)}
    def steps(examples: int) -> int:
        return max(examples // 64, 1)
    small = reply(1, nudged(model, 0.374, 1), **{"num-examples": 36})
    large = reply(2, nudged(model, 4.667, 2), **{"num-examples": 2000})
    assert screen([small, large], spec_of(model), model, RATIO, local_steps=steps).rejected == {}
    assert list(screen([small, large], spec_of(model), model, RATIO).rejected) == [2]
    huge = reply(2, nudged(model, 466.7, 2), **{"num-examples": 2000})
    rejected = screen([small, huge], spec_of(model), model, RATIO, local_steps=steps).rejected
    assert list(rejected) == [2] and "for each of 31 local steps" in rejected[2], rejected


@FAST
@given(model=models(), scale=st.floats(0.0, 10.0), seed=st.integers(0, 99))
def test_update_norm_measures_the_floating_point_step(model, scale, seed):
    assert np.isclose(update_norm(nudged(model, scale, seed), model), scale, rtol=1e-3, atol=1e-3)


def test_arrays_spanning_many_blocks_are_summed_and_measured_whole():
    # Walked block by block; a Fortran-ordered reply must line up with the C-ordered sum.
    rng = np.random.default_rng(0)
    model = {"conv": rng.standard_normal((3, BLOCK + 5)).astype(np.float32), "steps": np.array(7)}
    updates = [nudged(model, 0.5 * (i + 1), i) for i in range(3)]
    updates[1]["conv"] = np.asfortranarray(updates[1]["conv"])
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in u.items()}),
                                   "metrics": MetricRecord({"num-examples": i + 1})}),
                       reply_to=Message(RecordDict(), i, "train")) for i, u in enumerate(updates)]
    mean = WeightedMean()
    result = screen(replies, spec_of(model), model, RATIO, mean)
    assert not result.rejected
    want = sum((i + 1) * u["conv"].astype(np.float64) for i, u in enumerate(updates)) / 6
    np.testing.assert_allclose(mean.result()["conv"], want, rtol=1e-5, atol=1e-5)
    for i, update in enumerate(updates):
        assert np.isclose(update_norm(update, model), 0.5 * (i + 1), rtol=1e-4)


def test_the_walk_shared_over_threads_gives_the_single_thread_result():
    rng = np.random.default_rng(1)
    model = {"a": rng.standard_normal(3 * BLOCK + 7).astype(np.float32), "b": rng.standard_normal(9).astype(np.float32)}
    update = nudged(model, 2.0, 3)
    results = []
    for threads in (1, 3):
        sums = {k: np.zeros(v.size, v.dtype) for k, v in model.items()}
        norm = BlockWalker(threads).run(update, model, sums, weight=0.5)
        results.append((norm, sums))
    (norm1, sums1), (norm3, sums3) = results
    assert np.isclose(norm1, norm3, rtol=1e-6) and np.isclose(norm1, 2.0, rtol=1e-4)
    for key in model:
        np.testing.assert_array_equal(sums1[key], sums3[key])
        np.testing.assert_allclose(sums1[key], 0.5 * update[key], rtol=1e-6)
