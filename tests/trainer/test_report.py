"""Run logging: metrics.jsonl survives a resume whatever happened to the file since the checkpoint."""

from __future__ import annotations

import pytest

from cpt.trainer.report import METRICS, REPORT, RunLog, plot_report, read_metrics


def test_resume_with_a_missing_metrics_file_writes_no_nul_bytes_and_plots(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.write({"step": 0, "domain_ppl": 30.0})
    log.write({"step": 1, "loss": 3.2})
    checkpoint_bytes = log.offset()
    log.close()
    (tmp_path / METRICS).unlink()  # the user moved it away; the checkpoint still records its size

    with pytest.warns(UserWarning, match=f"holds 0 bytes but the checkpoint recorded {checkpoint_bytes}"):
        resumed = RunLog(tmp_path, enabled=True, resume_bytes=checkpoint_bytes, resume_step=1)
    resumed.write({"step": 2, "loss": 3.1, "domain_ppl": 25.0})
    resumed.offset()
    resumed.close()

    assert b"\0" not in (tmp_path / METRICS).read_bytes()
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 3.1, "domain_ppl": 25.0}]
    plot_report(read_metrics(tmp_path), tmp_path / REPORT)  # what the next checkpoint does
    assert (tmp_path / REPORT).stat().st_size > 0


def test_resume_cuts_the_lines_written_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.write({"step": 1, "loss": 3.0})
    checkpoint_bytes = log.offset()
    log.write({"step": 2, "loss": 2.9})  # written by the run that was killed before its next checkpoint
    log.close()

    resumed = RunLog(tmp_path, enabled=True, resume_bytes=checkpoint_bytes, resume_step=1)
    resumed.write({"step": 2, "loss": 2.8})
    resumed.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.8}]
