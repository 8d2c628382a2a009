"""`fedssl`: bad input is one line on stderr and exit code 2; nothing starts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fedssl.simulations.cli import main


@pytest.mark.parametrize("args, fragment", [
    (["--method", "ijepa"], "method='ijepa' is invalid: allowed: byol, simsiam"),
    (["--dataset", "imagenet"], "dataset='imagenet' is invalid: allowed:"),
    (["--strategy", "fedfoo"], "strategy='fedfoo' is invalid: allowed: fedavg"),
    (["--rounds", "0"], "num-rounds=0 is invalid: must be >= 1"),
    (["--batch-size", "many"], "batch-size='many' is invalid: must be an integer"),
    (["--dataset", "imagefolder", "--data-path", "/nonexistent/images"], "/nonexistent/images"),
    (["--preset", "no-such-preset"], "--preset 'no-such-preset': no such file or preset"),
    (["--num-clients", "1"], "num-clients=1 is invalid: must be >= min-train-clients (2)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, fragment):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.startswith("fedssl: error:") and "\n" not in err


def test_empty_folder_is_named(tmp_path, capsys):
    assert main(["simulate", "--dataset", "imagefolder", "--data-path", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_unlabelled_eval_folder_is_refused(tmp_path, image_folder, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted(image_folder.rglob("*.png"))[:5]):
        (flat / f"{i}.png").write_bytes(png.read_bytes())
    code = main(["centralized", "--dataset", "imagefolder", "--data-path", str(flat)])
    assert code == 2 and str(flat) in capsys.readouterr().err


def test_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fedssl.simulations.cli", "simulate", "--method", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "method='x' is invalid" in proc.stderr


def test_bare_boolean_flags_mean_true_and_resume_needs_a_checkpoint(tmp_path, capsys):
    from fedssl.simulations.cli import parser, settings

    cfg, _ = settings(parser().parse_args(["simulate", "--resume", "--probe", "false"]))
    assert cfg.resume is True and cfg.probe is False
    assert main(["simulate", "--resume", "--out", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err.strip()
    assert "resume=True is invalid" in err and str(tmp_path / "gone") in err and "\n" not in err


def test_run_config_text_is_read_as_flwr_run_reads_it_and_flags_win():
    from fedssl.simulations.cli import parser, settings

    cfg, harness = settings(parser().parse_args(
        ["simulate", "--run-config", 'num-rounds=7 method="simsiam" num-clients=4', "--rounds", "3"]))
    assert (cfg.num_rounds, cfg.method, harness["num-clients"]) == (3, "simsiam", 4)


def test_a_bad_run_config_value_is_one_line(capsys):
    assert main(["simulate", "--run-config", "num-rounds=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedssl: error:") and "num-rounds=0 is invalid" in err and "\n" not in err
