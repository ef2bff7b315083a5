"""The CSV tracker: long-format rows, a resumed run drops the interrupted run's later rows, nothing is lost after."""
import csv

from wrapssl.tracking import CSVTracker


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_rows_are_step_name_value(tmp_path):
    tracker = CSVTracker(tmp_path / "m.csv")
    tracker.start()
    tracker.log({"loss": 1.5, "lr": 0.1, "note": "text", "flag": True}, step=3)
    assert rows(tmp_path / "m.csv") == [["step", "name", "value"], ["3", "loss", "1.5"], ["3", "lr", "0.1"]]
    tracker.store_init_configuration({"lr": 0.1})
    assert (tmp_path / "config.json").read_text().strip().startswith("{")


def test_resume_drops_rows_after_the_checkpoint_and_keeps_the_rest(tmp_path):
    path = tmp_path / "m.csv"
    first = CSVTracker(path)
    first.start()
    for step in range(1, 7):
        first.log({"loss": float(step)}, step=step)
    first.finish()
    resumed = CSVTracker(path, resume_step=4)
    resumed.start()
    resumed.log({"loss": 50.0}, step=5)
    assert [r[:1] + r[2:] for r in rows(path)[1:]] == [["1", "1.0"], ["2", "2.0"], ["3", "3.0"], ["4", "4.0"],
                                                      ["5", "50.0"]]


def test_logging_after_finish_appends_and_never_drops_rows(tmp_path):
    path = tmp_path / "m.csv"
    tracker = CSVTracker(path, resume_step=1)
    tracker.start()
    for step in (2, 3):
        tracker.log({"loss": float(step)}, step=step)
    tracker.finish()
    tracker.log({"loss": 4.0}, step=4)
    tracker.finish()
    assert [r[0] for r in rows(path)[1:]] == ["2", "3", "4"]
