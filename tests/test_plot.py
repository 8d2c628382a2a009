"""`fedssl plot`: one PNG of kNN top-1 and loss per round for one or several run directories,
labelled from each run's own config; bad input is one line and exit code 2."""
from __future__ import annotations

import json
import struct

import pytest

from fedssl.common.config import RunConfig
from fedssl.simulations.cli import main
from fedssl.simulations.plot import run_label

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, knn: list[float], summary: dict | None = None):
    run_dir.mkdir(parents=True)
    rows = [{"round": r, "knn_top1": v, "train_loss": None if r == 0 else 2.0 - 0.1 * r}
            for r, v in enumerate(knn)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_one_run(tmp_path, capsys):
    run = write_run(tmp_path / "a", [0.3, 0.35, 0.4], {"config": RunConfig().to_mapping()})
    out = tmp_path / "figs" / "one.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    width, height = png_size(out)
    assert width > 600 and height > 300
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "runs": 1}


def test_several_runs_one_cut_short_without_summary(tmp_path):
    dirichlet = RunConfig(partition="dirichlet", alpha=0.1, strategy="fedema").to_mapping()
    runs = [write_run(tmp_path / "iid", [0.3, 0.4], {"config": RunConfig().to_mapping()}),
            write_run(tmp_path / "noniid", [0.3, 0.33, 0.31], {"config": dirichlet}),
            write_run(tmp_path / "central", [0.3, 0.5], {"config": RunConfig().to_mapping(),
                                                         "centralized": True}),
            write_run(tmp_path / "killed", [0.3])]
    out = tmp_path / "many.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    png_size(out)
    assert [run_label(r) for r in runs] == ["simclr + fedavg, iid", "simclr + fedema, dirichlet a=0.1",
                                            "simclr centralized", "killed"]


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: [str(tmp / "missing"), "--out", str(tmp / "x.png")], "has no metrics.jsonl"),
    (lambda tmp: [str(write_run(tmp / "r", [0.3])), "--out", str(tmp / "x.pdf")], "must end in .png"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, fragment):
    assert main(["plot", *make_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedssl: error:") and fragment in err and "\n" not in err
