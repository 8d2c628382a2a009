"""Progress: a log line per round when the log is not a terminal; on a terminal one status
line rewritten in place, which log lines never share."""
from __future__ import annotations

import io
import logging

import pytest

from fedssl.common.logs import get_logger
from fedssl.server.progress import Progress, progress_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROWS = [{"round": 0, "knn_top1": 0.4, "seconds": 2.0},
        {"round": 1, "knn_top1": 0.45, "train_loss": 1.8, "clients_ok": 2, "clients_failed": 1,
         "aggregated": True, "seconds": 60.0},
        {"round": 2, "knn_top1": 0.5, "probe_top1": 0.55, "train_loss": 1.7, "clients_ok": 3,
         "clients_failed": 0, "aggregated": True, "seconds": 120.0}]


@pytest.fixture
def log_stream(request):
    """The fedssl log handler writing to the stream the test asks for."""
    handler = get_logger().handlers[0]
    stream = request.param()
    previous = handler.setStream(stream)
    yield stream
    handler.setStream(previous)


def test_the_line_names_round_clients_loss_accuracy_and_eta():
    assert progress_line(ROWS[1], 3, eta=185.0) == (
        "round 1/3 | clients 2 ok 1 failed | loss 1.8000 | kNN top-1 0.4500 | 60.0 s | ETA 3m05s")
    assert progress_line(ROWS[0], 3) == "round 0/3 | kNN top-1 0.4000 | 2.0 s"
    assert progress_line({"round": 2, "train_loss": 1.0, "seconds": 1.0}, 2, "epoch", 0.0) == (
        "epoch 2/2 | loss 1.0000 | 1.0 s")  # the centralized baseline: no clients, no ETA at the end


@pytest.mark.parametrize("log_stream", [io.StringIO], indirect=True)
def test_not_a_terminal_logs_one_plain_line_per_round(log_stream):
    with Progress(3) as progress:
        for row in ROWS:
            progress.update(row)
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in log_stream.getvalue()
    assert lines[1].startswith("fedssl INFO: round 1/3 | clients 2 ok 1 failed")
    # the mean of the rounds that trained (60 s, 120 s) times the one round left
    assert lines[1].endswith("ETA 2m00s") and lines[2].endswith("ETA 1m30s")


@pytest.mark.parametrize("log_stream", [Terminal], indirect=True)
def test_a_terminal_gets_one_line_rewritten_in_place(log_stream):
    with Progress(3) as progress:
        progress.update(ROWS[0])
        progress.update(ROWS[1])
        logging.getLogger("fedssl").warning("client 7 rejected")
        progress.update(ROWS[2])
    text = log_stream.getvalue()
    # the status lines overwrite each other; the warning clears it, prints, then redraws it
    assert text.count("\n") == 2 and text.endswith("probe 0.5500 | 120.0 s | ETA 1m30s\n")
    warning_at = text.index("fedssl WARNING: client 7 rejected\n")
    assert text[warning_at - 4:warning_at] == "\r\x1b[K"
    assert text[warning_at:].split("\n", 1)[1].startswith("round 1/3")
    assert text.count("\r\x1b[K") == 4  # three updates and the warning
