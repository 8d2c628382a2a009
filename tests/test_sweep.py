"""`fedssl sweep` and its report: a killed sweep continues without re-running a finished run;
the t-interval and paired differences on known inputs; a bad spec is one line naming the key;
the validation monitor never trains on its queries and scores test once; and the report
cannot choose, rank or even read a test number outside the cells chosen on validation."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedssl.client.local_data import local_images
from fedssl.common.datasets import load_images
from fedssl.common.provenance import code_version
from conftest import fast_config
from fedssl.server.evaluation import GlobalEvaluator
from fedssl.simulations import sweep_report
from fedssl.simulations.cli import main
from fedssl.simulations.sweep import SpecError, api_runner, final_round, load_spec, run_sweep
from fedssl.simulations.sweep_report import Interval, build_report, choose, paired, t_interval, t_quantile

# t(0.975, df), from any table of Student's t (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042}


# ------------------------------------------------------------------------ arithmetic

@pytest.mark.parametrize("df, expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 12, 50):
        assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_t_interval_on_known_values():
    # mean 2, s = 1, n = 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    iv = t_interval([1.0, 2.0, 3.0])
    assert (iv.n, iv.mean) == (3, 2.0)
    assert iv.low == pytest.approx(2.0 - 2.484138, abs=1e-5)
    assert iv.high == pytest.approx(2.0 + 2.484138, abs=1e-5)
    # n = 5, values 10..14: mean 12, s = sqrt(2.5), t(0.975, 4) = 2.776445
    iv = t_interval([10, 11, 12, 13, 14])
    assert iv.high - iv.mean == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5)
    assert t_interval([0.4]) == Interval(1, 0.4, None, None)  # one seed: no interval
    assert t_interval([]).mean is None


def test_paired_differences_use_the_common_seeds_only():
    cell = {0: 0.50, 1: 0.60, 2: 0.70}
    baseline = {0: 0.40, 1: 0.45, 2: 0.50, 3: 0.90}  # seed 3 has no partner: left out
    diff, seeds = paired(cell, baseline)
    assert seeds == [0, 1, 2]
    # differences 0.10, 0.15, 0.20: mean 0.15, s = 0.05
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert diff.mean == pytest.approx(0.15)
    assert (diff.low, diff.high) == (pytest.approx(0.15 - half), pytest.approx(0.15 + half))
    assert diff.excludes_zero is True
    # the same means unpaired would overlap: pairing removes the per-seed offset
    noisy, _ = paired({0: 0.50, 1: 0.40, 2: 0.60}, {0: 0.45, 1: 0.45, 2: 0.45})
    assert noisy.excludes_zero is False


# ------------------------------------------------------------------------ the spec

GOOD = """
seeds = [0, 1]
baseline = "a"
[base]
dataset = "synthetic"
num-clients = 2
[cells.a]
lr = 0.05
[cells.b]
lr = 0.1
"""


@pytest.mark.parametrize("change, named", [
    (("seeds = [0, 1]", "seeds = []"), "seeds"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "seeds"),
    (('baseline = "a"', 'baseline = "z"'), "baseline"),
    (('baseline = "a"', 'baseline = "a"\nrounds = 3'), "'rounds'"),
    (("lr = 0.1", "lrr = 0.1"), "'lrr'"),
    (("lr = 0.1", 'lr = "fast"'), "lr="),
    (("lr = 0.1", "seed = 3"), "cells.b.seed"),
    (("lr = 0.1", 'monitor = "test"'), "cells.b.monitor"),
    (("num-clients = 2", "num-clients = 1"), "num-clients"),
    (("lr = 0.1", 'strategy = "fedfoo"'), "strategy="),
    (("lr = 0.1", 'command = "deploy"'), "cells.b.command"),
])
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, change, named):
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD.replace(*change))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedssl: error: ")
    assert named in err and str(spec) in err
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_a_good_spec_parses(tmp_path):
    (tmp_path / "s.toml").write_text(GOOD)
    spec = load_spec(tmp_path / "s.toml")
    assert [c.name for c in spec.cells] == ["a", "b"] and spec.seeds == (0, 1)
    assert spec.cell("b").config == {"dataset": "synthetic", "lr": 0.1, "monitor": "validation"}
    assert spec.cell("b").harness["num-clients"] == 2


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "experiments").glob("sweep-*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_spec_parses(path):
    """The specs docs/results.md reproduces its tables with: a key renamed or a default's
    choices narrowed would otherwise surface hours into someone's sweep."""
    spec = load_spec(path)
    assert spec.baseline in [c.name for c in spec.cells] and spec.seeds


# --------------------------------------------------------------- the validation monitor

def pixels(images) -> set[bytes]:
    return {r.tobytes() for r in images.images[:].reshape(len(images), -1).numpy()}


def test_validation_queries_are_never_trained_on_and_test_is_apart(image_folder, tmp_path):
    cfg = fast_config(image_folder, tmp_path, monitor="validation")
    full = pixels(load_images("imagefolder", str(image_folder), cfg.image_size))
    trained = set().union(*(pixels(local_images(cfg, {"partition-id": i, "num-partitions": 3}))
                            for i in range(3)))
    evaluator = GlobalEvaluator(cfg, torch.device("cpu"))
    validation, test = pixels(evaluator.validation[1]), pixels(evaluator.query)
    assert len(validation) == 4 * 2  # 10% of the 19 training images of each of 4 classes
    assert not trained & validation and not trained & test and not validation & test
    assert trained | validation | test == full
    assert not pixels(evaluator.validation[0]) & validation  # a query is not its own neighbour
    # the same seed carves the same rows again (clients and server agree without talking)
    assert pixels(GlobalEvaluator(cfg, torch.device("cpu")).validation[1]) == validation


# ------------------------------------------------------------------------- resume

class Killed(BaseException):
    """Escapes the sweep the way SIGKILL ends it."""


def tiny_spec(tmp_path: Path, folder: Path) -> Path:
    spec = tmp_path / "tiny.toml"
    spec.write_text(f"""
seeds = [0]
baseline = "slow"
[base]
dataset = "imagefolder"
data-path = "{folder}"
eval-path = "{folder}"
image-size = 16
batch-size = 4
threads = 1
probe = false
knn-k = 5
proj-dim = 32
hidden-dim = 64
num-rounds = 2
fraction-train = 1.0
[cells.slow]
command = "centralized"
lr = 0.01
[cells.fast]
command = "centralized"
lr = 0.1
""")
    return spec


def test_a_killed_sweep_continues_without_rerunning_a_finished_run(small_image_folder, tmp_path):
    spec, out = load_spec(tiny_spec(tmp_path, small_image_folder)), tmp_path / "sweep"
    real = api_runner()
    calls: list[str] = []

    def killed_in_the_second_run(cell, cfg):
        calls.append(cell.name)
        if len(calls) == 2:
            # cut short: its first rows are on disk, no summary.json
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "metrics.jsonl").write_text('{"round": 0, "val_knn_top1": 0.5}\n')
            raise Killed()
        return real(cell, cfg)

    with pytest.raises(Killed):
        run_sweep(spec, out, runner=killed_in_the_second_run, say=lambda line: None)
    first = out / "slow" / "seed-0"
    finished = (first / "summary.json").read_bytes()
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    # the validation monitor: every row scores validation; only the final one touches test
    assert all(r.get("val_knn_top1") is not None for r in rows)
    assert [r["round"] for r in rows if "knn_top1" in r] == [rows[-1]["round"]]

    calls.clear()
    lines: list[str] = []

    def counting(cell, cfg):
        calls.append(cell.name)
        return real(cell, cfg)

    counts = run_sweep(spec, out, runner=counting, say=lines.append)
    assert calls == ["fast"] and counts == {"run": 1, "skipped": 1, "failed": 0}
    assert (first / "summary.json").read_bytes() == finished  # not run again
    assert any("cut short" in line for line in lines)
    assert (out / "fast" / "seed-0" / "summary.json").is_file()

    calls.clear()
    assert run_sweep(spec, out, runner=counting, say=lambda line: None)["skipped"] == 2 and calls == []

    report = build_report(out)
    assert {row["cell"] for row in report["cells"]} == {"slow", "fast"}
    assert all(row["validation"]["n"] == 1 for row in report["cells"])
    # each run recorded the code that made it, and both came from the same
    assert json.loads(finished)["code"] == code_version()
    assert list(report["code"].values()) == [["slow seed 0", "fast seed 0"]]


def test_a_folder_holding_other_settings_is_refused_not_overwritten(small_image_folder, tmp_path):
    spec, out = load_spec(tiny_spec(tmp_path, small_image_folder)), tmp_path / "sweep"
    folder = out / "slow" / "seed-0"
    folder.mkdir(parents=True)
    other = spec.cell("slow").run_config(0, folder).replace(lr=0.3).to_mapping()
    (folder / "summary.json").write_text(json.dumps({"config": other, "final": {"round": 2}}))
    with pytest.raises(SpecError, match="lr=0.3 there, 0.01 here"):
        run_sweep(spec, out, runner=lambda cell, cfg: pytest.fail("ran"), say=lambda line: None)


def test_a_run_recorded_before_a_key_existed_is_refused_not_taken_as_finished(small_image_folder, tmp_path):
    # Its behaviour then need not be today's default (predictor-lr-schedule: cosine then,
    # constant now), so it cannot stand for a run with today's settings.
    spec, out = load_spec(tiny_spec(tmp_path, small_image_folder)), tmp_path / "sweep"
    folder = out / "slow" / "seed-0"
    folder.mkdir(parents=True)
    older = spec.cell("slow").run_config(0, folder).to_mapping()
    del older["predictor-lr-schedule"]
    (folder / "summary.json").write_text(json.dumps({"config": older, "final": {"round": 2}}))
    with pytest.raises(SpecError, match="predictor-lr-schedule absent there"):
        run_sweep(spec, out, runner=lambda cell, cfg: pytest.fail("ran"), say=lambda line: None)


def test_whose_test_numbers_are_read_cannot_be_changed_once_runs_finished(small_image_folder, tmp_path):
    path, out = tiny_spec(tmp_path, small_image_folder), tmp_path / "sweep"

    def finished(cell, cfg):  # the files a finished run leaves, without its training
        last, folder = final_round(cell, cfg), Path(cfg.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"round": last}) + "\n")
        (folder / "summary.json").write_text(json.dumps({"config": cfg.to_mapping(), "final": {"round": last}}))

    quiet = dict(say=lambda line: None)
    assert run_sweep(load_spec(path), out, runner=finished, **quiet)["run"] == 2
    text = path.read_text()
    path.write_text(text.replace('baseline = "slow"', 'baseline = "slow"\nreport-test = ["fast"]'))
    with pytest.raises(SpecError, match="report-test names 'fast', which has finished runs"):
        run_sweep(load_spec(path), out, runner=finished, **quiet)
    path.write_text(text.replace('baseline = "slow"', 'baseline = "fast"'))
    with pytest.raises(SpecError, match="baseline='fast' is invalid for .*named in advance"):
        run_sweep(load_spec(path), out, runner=finished, **quiet)
    # named before any run: a new folder takes either
    assert run_sweep(load_spec(path), tmp_path / "another", runner=finished, **quiet)["run"] == 2
    path.write_text(text)  # and the original spec goes on as before
    assert run_sweep(load_spec(path), out, runner=finished, **quiet)["skipped"] == 2


def test_a_diverged_run_is_marked_failed_counted_and_not_run_again(small_image_folder, tmp_path):
    spec, out = load_spec(tiny_spec(tmp_path, small_image_folder)), tmp_path / "sweep"
    real = api_runner()

    def slow_diverges(cell, cfg):
        if cell.name != "slow":
            return real(cell, cfg)
        (Path(cfg.out_dir) / "metrics.jsonl").write_text(
            '{"round": 0, "val_knn_top1": 0.5, "finite": true}\n{"round": 1, "finite": false}\n')
        raise RuntimeError("the global model gives non-finite features")

    assert run_sweep(spec, out, runner=slow_diverges, say=lambda line: None)["failed"] == 1
    assert run_sweep(spec, out, runner=lambda cell, cfg: pytest.fail("ran again"),
                     say=lambda line: None)["skipped"] == 2
    rows = {row["cell"]: row for row in build_report(out)["cells"]}
    assert rows["slow"]["failed"] == {0: "non-finite model in round 1"} and rows["slow"]["seeds"] == []
    assert rows["fast"]["seeds"] == [0]


def test_the_seed_fixes_the_partitions_whatever_the_cell(image_folder, tmp_path):
    from fedssl.simulations.sweep import parse_spec, partition_digest

    spec = parse_spec({"seeds": [0, 1], "baseline": "a",
                       "base": {"dataset": "imagefolder", "data-path": str(image_folder),
                                "partition": "dirichlet", "alpha": 0.3, "num-clients": 3,
                                "method": "byol"},
                       "cells": {"a": {"strategy": "fedavg"}, "b": {"strategy": "fedu", "lr": 0.1}}})
    a, b = spec.cell("a"), spec.cell("b")
    digest = {(c.name, s): partition_digest(c, c.run_config(s, tmp_path)) for c in (a, b) for s in (0, 1)}
    assert digest["a", 0] == digest["b", 0] and digest["a", 1] == digest["b", 1]
    assert digest["a", 0] != digest["a", 1]


# --------------------------------------------------------------- no choice on test

def fake_sweep(root: Path, scores: dict[str, list[tuple[float, float]]], baseline: str,
               digests: dict[tuple[str, int], str] | None = None,
               commits: dict[tuple[str, int], str] | None = None,
               starts: dict[tuple[str, int], float] | None = None,
               lost: dict[tuple[str, int], list[int]] | None = None) -> Path:
    """A sweep folder as `fedssl sweep` leaves it: per cell and seed (validation, test);
    round 0's validation score is 0.1 unless `starts` gives it; rounds 1-2 record whether
    they aggregated where `lost` names a run (the rounds that did not)."""
    seeds = list(range(len(next(iter(scores.values())))))
    manifest = {"command": "fedssl sweep s.toml --out x", "seeds": seeds, "baseline": baseline,
                "report-test": [], "description": "",
                "cells": [{"name": c, "command": "simulate", "overrides": {"lr": i}, "config": {}, "harness": {}}
                          for i, c in enumerate(scores)]}
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps(manifest))
    for cell, runs in scores.items():
        for seed, (val, test) in enumerate(runs):
            folder = root / cell / f"seed-{seed}"
            folder.mkdir(parents=True)
            rows = [{"round": 0, "val_knn_top1": (starts or {}).get((cell, seed), 0.1)},
                    {"round": 1, "val_knn_top1": val - 0.01},
                    {"round": 2, "val_knn_top1": val, "knn_top1": test, "probe_top1": test}]
            if (cell, seed) in (lost or {}):
                for row in rows[1:]:
                    row["aggregated"] = row["round"] not in lost[cell, seed]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            code = {"fedssl": "0.1", "commit": (commits or {}).get((cell, seed), "a" * 40), "modified": False}
            (folder / "summary.json").write_text(json.dumps({"final": rows[-1], "seconds": 60.0, "code": code}))
            digest = (digests or {}).get((cell, seed), f"seed{seed}")
            (folder / "sweep-run.json").write_text(json.dumps({"partition_digest": digest}))
    return root


# validation says a > b > base; test would say b (0.987654) is far the best
SCORES = {"base": [(0.30, 0.31), (0.32, 0.33), (0.31, 0.30)],
          "b": [(0.40, 0.987654), (0.41, 0.987654), (0.42, 0.987654)],
          "a": [(0.50, 0.35), (0.53, 0.36), (0.51, 0.34)]}


def test_the_report_chooses_and_ranks_by_validation_and_reads_test_only_for_the_chosen(tmp_path, monkeypatch):
    root = fake_sweep(tmp_path / "sweep", SCORES, baseline="base")
    read = []
    real_test_scores = sweep_report.test_scores
    monkeypatch.setattr(sweep_report, "test_scores",
                        lambda folder: read.append(folder.parent.name) or real_test_scores(folder))
    report = build_report(root)
    assert report["selection"]["best"] == "a"
    assert [row["cell"] for row in report["cells"]] == ["a", "b", "base"]
    assert sorted(set(read)) == ["a", "base"]  # b's test numbers are never even read
    b = next(row for row in report["cells"] if row["cell"] == "b")
    assert "test" not in b and b["chosen"] is False
    a = next(row for row in report["cells"] if row["cell"] == "a")
    assert a["test"]["knn_top1"]["mean"] == pytest.approx(0.35)
    assert a["validation_vs_baseline"]["excludes_zero"] is True

    paths = sweep_report.write_report(root)
    for key in ("markdown", "json", "csv"):
        text = paths[key].read_text()
        assert "0.987" not in text and "0.988" not in text, key
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_cells_that_finished_every_seed_compete_for_the_choice(tmp_path):
    # a is the best on the seeds it finished, but its seed 1 has not run: a mean over other
    # seeds than b's is not comparable, so b is chosen and a ranks after every complete cell
    root = fake_sweep(tmp_path / "sweep", SCORES, baseline="base")
    shutil.rmtree(root / "a" / "seed-1")
    report = build_report(root)
    assert report["selection"]["best"] == "b"
    assert [row["cell"] for row in report["cells"]] == ["b", "base", "a"]
    assert report["selection"]["test_reported_for"] == ["b", "base"]
    shutil.copytree(root / "b" / "seed-0", root / "a" / "seed-1")  # a finishes: chosen again
    assert build_report(root)["selection"]["best"] == "a"


def test_values_all_equal_give_no_interval_and_no_claim(tmp_path):
    equal = t_interval([0.25, 0.25, 0.25])
    assert (equal.low, equal.high) == (0.25, 0.25) and equal.excludes_zero is None
    identical, _ = paired({0: 0.3, 1: 0.4, 2: 0.5}, {0: 0.3, 1: 0.4, 2: 0.5})
    assert identical.mean == 0.0 and identical.excludes_zero is None
    # a rule that never acted reproduces its baseline run for run: shown as such, no "no"/"yes"
    report = build_report(fake_sweep(tmp_path / "sweep", {**SCORES, "same": SCORES["base"]}, baseline="base"))
    same = next(row for row in report["cells"] if row["cell"] == "same")
    assert same["validation_vs_baseline"]["excludes_zero"] is None
    line = next(l for l in sweep_report.markdown(report).splitlines() if l.split(" | ")[1:2] == ["same"])
    assert "+0.0 (all 3 equal: no interval) | -" in line


def test_test_scores_cannot_move_the_choice_or_the_ranking(tmp_path):
    flipped = {cell: [(val, 1.0 - test) for val, test in runs] for cell, runs in SCORES.items()}
    one = build_report(fake_sweep(tmp_path / "one", SCORES, baseline="base"))
    two = build_report(fake_sweep(tmp_path / "two", flipped, baseline="base"))
    assert one["selection"] == two["selection"]
    assert [r["cell"] for r in one["cells"]] == [r["cell"] for r in two["cells"]]
    # and the choice itself takes validation intervals, nothing else
    assert choose({"x": Interval(3, 0.2, 0.1, 0.3), "y": Interval(3, 0.25, 0.0, 0.5)}) == "y"


def test_the_gain_over_round_0_is_paired_within_each_run(tmp_path):
    # base's final scores 0.30, 0.32, 0.31 from starts 0.28, 0.33, 0.29: gains +2, -1, +2 points,
    # which a gain over the mean start (+0.33) or over another seed's start would not give
    starts = {("base", 0): 0.28, ("base", 1): 0.33, ("base", 2): 0.29}
    report = build_report(fake_sweep(tmp_path / "sweep", SCORES, baseline="base", starts=starts))
    rows = {row["cell"]: row for row in report["cells"]}
    gain = rows["base"]["gain_over_round_0"]
    assert gain["per_seed"] == {0: pytest.approx(0.02), 1: pytest.approx(-0.01), 2: pytest.approx(0.02)}
    half = T_TABLE[2] * math.sqrt(((0.01) ** 2 * 2 + 0.02 ** 2) / 2) / math.sqrt(3)
    assert gain["mean"] == pytest.approx(0.01) and gain["high"] == pytest.approx(0.01 + half, abs=1e-4)
    assert gain["excludes_zero"] is False
    assert rows["a"]["gain_over_round_0"]["excludes_zero"] is True  # 0.50-0.53 from 0.1
    table = sweep_report.markdown(report)
    assert "val gain over round 0" in table and "+1.0 [" in table
    assert "gain_mean" in sweep_report.csv_text(report).splitlines()[0]


def test_the_report_counts_the_rounds_that_kept_the_old_model(tmp_path):
    lost = {("b", 0): [1, 2], ("b", 1): [], ("b", 2): [2]}
    report = build_report(fake_sweep(tmp_path / "sweep", SCORES, baseline="base", lost=lost))
    rows = {row["cell"]: row for row in report["cells"]}
    assert rows["b"]["rounds_lost"] == {0: 2, 1: 0, 2: 1}
    assert rows["a"]["rounds_lost"] == {0: None, 1: None, 2: None}  # not recorded, not 0
    assert "| 2, 0, 1 |" in sweep_report.markdown(report)


def test_the_report_says_when_a_seed_gave_other_partitions(tmp_path):
    root = fake_sweep(tmp_path / "sweep", SCORES, baseline="base", digests={("b", 1): "other"})
    rows = {row["cell"]: row for row in build_report(root)["cells"]}
    assert rows["a"]["partitions_vs_baseline"] == "same"
    assert rows["b"]["partitions_vs_baseline"] == "differ (seeds 1)"


def test_the_report_names_the_commit_and_flags_runs_made_by_different_code(tmp_path):
    same = sweep_report.markdown(build_report(fake_sweep(tmp_path / "same", SCORES, baseline="base")))
    assert "Code: commit aaaaaaa (all 9 finished runs)." in same
    mixed = build_report(fake_sweep(tmp_path / "mixed", SCORES, baseline="base", commits={("b", 2): "b" * 40}))
    assert mixed["code"]["commit bbbbbbb"] == ["b seed 2"]
    assert "**Runs made by different code**" in sweep_report.markdown(mixed)
    assert "commit bbbbbbb: b seed 2" in sweep_report.markdown(mixed)


def test_fedssl_plot_draws_a_sweep_with_bands(tmp_path, capsys):
    root = fake_sweep(tmp_path / "sweep", SCORES, baseline="base")
    out = tmp_path / "curves.png"
    assert main(["plot", str(root), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)["sweep"] == str(root)
    shutil.rmtree(root / "a")  # a cell with no finished run is left out, not an error
    assert main(["sweep-report", str(root)]) == 0
