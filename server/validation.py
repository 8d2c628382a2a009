"""Which train replies may be aggregated. A site we do not control can send anything; one
bad reply averaged in corrupts the global model for every site, and one malformed reply
makes Flower's aggregation raise for the whole round. So every reply is screened here
first and a rejected one carries a one-line reason for metrics.jsonl and the log."""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message

from fedssl.server.mean import BlockWalker, WeightedMean
from fedssl.server.npy_view import as_numpy

WEIGHT_KEY = "num-examples"
# Every array key is named when few differ; a reason stays one readable line otherwise.
MAX_KEYS_NAMED = 3

Spec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def spec_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def _named(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - MAX_KEYS_NAMED} more)" if len(keys) > MAX_KEYS_NAMED else ""
    return ", ".join(keys[:MAX_KEYS_NAMED]) + more


def array_problem(arrays: Mapping[str, np.ndarray], spec: Spec) -> str | None:
    """Why these arrays cannot stand in for the global model, or None."""
    missing, extra = spec.keys() - arrays.keys(), arrays.keys() - spec.keys()
    if missing:
        return f"missing arrays: {_named(missing)}"
    if extra:
        return f"unexpected arrays: {_named(extra)}"
    for key, (shape, dtype) in spec.items():
        value = arrays[key]
        if tuple(value.shape) != shape:
            return f"array {key} has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype != dtype:
            return f"array {key} has dtype {value.dtype}, expected {dtype}"
    return None


def non_finite_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    for key, value in arrays.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"array {key} holds NaN or Inf"
    return None


def metrics_problem(metrics: Mapping[str, object], weight_key: str = WEIGHT_KEY) -> str | None:
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        return f"metric {weight_key} is {weight!r}, expected a positive number"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(np.isfinite(v) for v in values):
            return f"metric {key} is not finite"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                walker: BlockWalker | None = None) -> float:
    """||client - global|| over floating-point arrays; integer buffers (BN step counters)
    count steps, not learning, and would only measure how much data a site has. Block by
    block (server/mean.py): a model-sized difference would cost more than the arithmetic."""
    return (walker or BlockWalker()).run(arrays, reference, sums=None)


def norm_outliers(norms: Mapping[int, float], max_ratio: float,
                  steps: Mapping[int, int] | None = None) -> dict[int, str]:
    """Updates more than `max_ratio` times the median norm, each norm taken per local SGD step
    the site took (`steps`; 1 each if not given). The lower median, so that with two replies
    a huge one is judged against the normal one, not against their mean.

    Per step because an honest update grows with the steps that made it (momentum SGD moves
    about linearly while the gradient keeps its direction) and non-IID sites differ in size
    by far more than the ratio: Dirichlet(0.1) over 10,000 CIFAR-10 images gave sites of 36
    to 2,251 images, and whole norms rejected the larger honest site of a round in 7
    of 180 rounds (docs/results.md). A site that overstates its examples gains a looser
    bound, as it gains weight in FedAvg's mean; screening stops crude attacks only
    (docs/security.md). A ratio of 0 turns the check off (under DP or SecAgg+,
    docs/privacy.md)."""
    if not norms or max_ratio == 0:
        return {}
    steps = steps or {}
    per_step = {node: norm / steps.get(node, 1) for node, norm in norms.items()}
    median = statistics.median_low(per_step.values())
    if median <= 0:
        return {}  # nobody moved: nothing to be far from
    return {node: (f"update norm {norms[node]:.4g} ({per:.4g} for each of {steps.get(node, 1)} local steps) "
                   f"is more than {max_ratio:g} x the round's median {median:.4g} a step")
            for node, per in per_step.items() if per > max_ratio * median}


def _signature(reply: Message) -> tuple:
    content = reply.content
    metrics = next(iter(content.metric_records.values()))
    return (tuple(content.array_records), tuple(content.metric_records), tuple(sorted(metrics)))


@dataclass
class Screening:
    accepted: list[Message] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


def _reply_problem(reply: Message, spec: Spec, weight_key: str) -> tuple[str | None, dict[str, np.ndarray]]:
    """Why the reply's layout or metrics cannot be aggregated (or None), and its arrays."""
    if reply.has_error():
        return f"client error: {reply.error.reason}", {}
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}"), {}
    try:
        arrays = _arrays(reply)
    except Exception as err:  # undecodable bytes are a bad reply, not a server crash
        return f"arrays cannot be decoded: {type(err).__name__}: {err}", {}
    return array_problem(arrays, spec) or metrics_problem(next(iter(content.metric_records.values())), weight_key), arrays


def _weight(reply: Message, weight_key: str) -> float:
    return float(next(iter(reply.content.metric_records.values()))[weight_key])


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return as_numpy(next(iter(reply.content.array_records.values())))


def screen(replies: Iterable[Message], spec: Spec, reference: Mapping[str, np.ndarray],
           max_norm_ratio: float, mean: WeightedMean | None = None,
           weight_key: str = WEIGHT_KEY, local_steps: Callable[[int], int] | None = None) -> Screening:
    """Split a round's train replies into those safe to aggregate and rejected ones; with
    `mean`, also sum the accepted ones into it, each weighted by its metric `weight_key` (the
    strategy's `weighted_by_key`: examples, or 1 for every site under DP, server/dp.py).
    `local_steps` maps a reply's `num-examples` to the SGD steps it trained (norm_outliers
    judges norms per step); without it every reply counts as one step."""
    result = Screening()
    # Each reply's arrays are decoded, checked and measured, then dropped: holding them all
    # would cost a model copy per reply on top of the replies themselves.
    candidates: list[tuple[Message, float]] = []
    summed_rejects = False
    walker = mean.walker if mean is not None else BlockWalker()
    for reply in replies:
        problem, arrays = _reply_problem(reply, spec, weight_key)
        if problem:
            result.rejected[reply.metadata.src_node_id] = problem
            continue
        # With a mean, the norm is measured in the pass that sums the reply: read once.
        norm = (mean.add(arrays, _weight(reply, weight_key), reference) if mean is not None
                else update_norm(arrays, reference, walker))
        if math.isfinite(norm):
            candidates.append((reply, norm))
        else:
            # A finite norm means finite arrays, so only a bad reply pays for looking at each.
            result.rejected[reply.metadata.src_node_id] = non_finite_problem(arrays) or f"update norm overflows ({norm})"
            summed_rejects = mean is not None

    # Flower aggregates only replies that share record names and metric keys; the most
    # common layout is the protocol, a stray one is the odd site out.
    if candidates:
        usual, _ = Counter(_signature(r) for r, _ in candidates).most_common(1)[0]
        for reply, _ in candidates:
            if _signature(reply) != usual:
                result.rejected[reply.metadata.src_node_id] = (
                    f"record names or metric keys {_signature(reply)} differ from the other replies' {usual}")

    kept = [(reply, norm) for reply, norm in candidates if reply.metadata.src_node_id not in result.rejected]
    norms = {reply.metadata.src_node_id: norm for reply, norm in kept}
    # Read only where the check runs: DP replies need not carry their examples.
    steps = ({reply.metadata.src_node_id: local_steps(int(_weight(reply, WEIGHT_KEY))) for reply, _ in kept}
             if local_steps is not None and max_norm_ratio != 0 else None)
    result.rejected.update(norm_outliers(norms, max_norm_ratio, steps))
    result.accepted = [r for r, _ in candidates if r.metadata.src_node_id not in result.rejected]
    if mean is not None and (summed_rejects or len(result.accepted) < len(candidates)):
        # Summed again without the rejects found after summing, rather than subtracting them:
        # an outlier's rounding error would stay in the sum (one of 1e30, or an infinity,
        # would wipe out the rest). Rare: a second read of the accepted replies.
        mean.clear()
        for reply in result.accepted:
            mean.add(_arrays(reply), _weight(reply, weight_key))
    return result
