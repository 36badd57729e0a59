"""The reporter that feeds the experiment trackers (report.to): what each tracker hears, and that a failing or
stalled tracker never stops or blocks the training loop. Fake trackers here; tests/test_trackers.py runs the
real ones and reads their stores back."""

from __future__ import annotations

import json
import threading
import warnings

import pytest

from deltatune.core.errors import DeltatuneWarning, MissingExtraError
from deltatune.task.config import ConfigError, validate_config
from deltatune.trackers import Outcome, Reporter, RunDescription, Tracker, require_trackers
from deltatune.trackers import reporter as reporter_module


def _run(tmp_path, resumed_at=None) -> RunDescription:
    return RunDescription(
        project="p", run_name="r", store=tmp_path / "store", config={"training": {"max_steps": 3}},
        data_summary={"rows": 10}, resumed_at=resumed_at,
    )  # fmt: skip


class Recording(Tracker):
    """Keeps every call; `fail_at` raises at that step, `gate` holds each log until it is set."""

    name = "recording"
    calls: list[tuple] = []
    fail_at: int | None = None
    gate: threading.Event | None = None

    def start(self, run):
        self.calls.append(("start", run.resume_id, run.resumed_at, run.config))
        return f"id-{len(self.calls)}"

    def log(self, step, metrics):
        if self.gate is not None:
            self.gate.wait()
        if step == self.fail_at:
            raise OSError(28, "No space left on device")
        self.calls.append(("log", step, metrics))

    def finish(self, outcome):
        self.calls.append(("finish", outcome.status))


def _started(names, run, ids_path, factory) -> Reporter:
    reporter = Reporter(names, run.store, ids_path, factory=factory)
    reporter.start(run)
    return reporter


def _factory(classes: dict[str, type[Tracker]]):
    return lambda name: classes[name]


def _tracker(**attrs) -> type[Tracker]:
    return type("T", (Recording,), {"calls": [], **attrs})


def test_each_tracker_hears_the_events_in_order_keyed_by_split(tmp_path):
    a, b = _tracker(), _tracker()
    reporter = _started(["a", "b"], _run(tmp_path), tmp_path / "trackers.json", _factory({"a": a, "b": b}))
    reporter.log_record({"step": 1, "split": "train", "loss": 2.5, "lr": 1e-3, "tokens_per_s": 100})
    reporter.log_record({"step": 2, "split": "validation", "loss": 2.0, "loss_only": True, "note": "x"})
    assert reporter.finish(Outcome("finished"))
    for tracker in (a, b):
        assert tracker.calls == [
            ("start", None, None, {"training": {"max_steps": 3}}),
            ("log", 1, {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0}),
            ("log", 2, {"validation/loss": 2.0}),  # the bool marker and the text are not metrics
            ("finish", "finished"),
        ]
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"a": "id-1", "b": "id-1"}
    assert not reporter.failures


def test_a_tracker_that_fails_mid_run_is_retired_with_one_warning_and_the_others_go_on(tmp_path):
    failing, fine = _tracker(fail_at=2), _tracker()
    reporter = _started(
        ["failing", "fine"],
        _run(tmp_path),
        tmp_path / "ids.json",
        _factory({"failing": failing, "fine": fine}),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            reporter.log_record({"step": step, "split": "train", "loss": float(step)})
        assert reporter.finish(Outcome("finished"))
    assert [c[1] for c in failing.calls if c[0] == "log"] == [1]  # nothing after the failure, not even finish
    assert failing.calls[-1][0] == "log"
    assert [c[1] for c in fine.calls if c[0] == "log"] == [1, 2, 3, 4, 5] and fine.calls[-1] == (
        "finish",
        "finished",
    )
    assert reporter.failures == {"failing": "step 2: OSError: [Errno 28] No space left on device"}
    said = [str(w.message) for w in caught if "report.to" in str(w.message)]
    assert said == [
        "report.to: failing failed at step 2 (OSError: [Errno 28] No space left on device); training goes on "
        "without it"
    ]


def test_a_tracker_that_fails_to_start_leaves_the_others(tmp_path):
    class Broken(Recording):
        def start(self, run):
            raise ConnectionError("server gone")

    fine = _tracker()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reporter = _started(
            ["broken", "fine"],
            _run(tmp_path),
            tmp_path / "ids.json",
            _factory({"broken": Broken, "fine": fine}),
        )
        reporter.log_record({"step": 1, "split": "train", "loss": 1.0})
        assert reporter.finish(Outcome("failed"))
    assert [str(w.message) for w in caught] == [
        "report.to: broken failed at start (ConnectionError: server gone); training goes on without it"
    ]
    assert reporter.failures == {"broken": "start: ConnectionError: server gone"}
    assert fine.calls[-1] == ("finish", "failed")
    assert json.loads((tmp_path / "ids.json").read_text()) == {"fine": "id-1"}


def test_a_stalled_tracker_never_blocks_the_loop_and_the_end_waits_only_so_long(tmp_path, monkeypatch):
    monkeypatch.setattr(reporter_module, "QUEUE_BOUND", 50)
    gate = threading.Event()
    stalled = _tracker(gate=gate)
    reporter = _started(["stalled"], _run(tmp_path), tmp_path / "ids.json", _factory({"stalled": stalled}))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 201):  # the tracker holds the first event: the queue fills, then events drop
                reporter.log_record({"step": step, "split": "train", "loss": 1.0})
            assert (
                149 <= reporter.dropped <= 151
            )  # 50 queued; the start event and one held log may be in or out
            assert reporter.finish(Outcome("finished"), wait_s=0.05) is False
        said = [str(w.message) for w in caught]
        assert sum("events behind" in m for m in said) == 1  # warned once, not per dropped event
        assert any(f"{reporter.dropped} events were dropped" in m for m in said)
        assert any("stalled had not finished after 0 s" in m for m in said)
    finally:
        gate.set()  # the tracker catches up; a second finish is queued this time, and ends its thread
        with pytest.warns(DeltatuneWarning, match=r"report.to: 1[45]\d events were dropped"):
            assert reporter.finish(Outcome("finished"), wait_s=600)
    assert stalled.calls[-1] == ("finish", "finished")


def test_resuming_gives_each_tracker_its_first_run_id(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps({"a": "run-7", "gone": "x"}))
    a = _tracker()
    reporter = _started(["a"], _run(tmp_path, resumed_at=6), tmp_path / "ids.json", _factory({"a": a}))
    assert reporter.finish(Outcome("finished"))
    assert a.calls[0][:3] == ("start", "run-7", 6)
    assert json.loads((tmp_path / "ids.json").read_text()) == {"a": "id-1", "gone": "x"}


def test_an_unreadable_ids_file_starts_new_runs(tmp_path):
    (tmp_path / "ids.json").write_text("{not json")
    a = _tracker()
    reporter = _started(["a"], _run(tmp_path, resumed_at=3), tmp_path / "ids.json", _factory({"a": a}))
    assert reporter.finish(Outcome("finished"))
    assert a.calls[0][1] is None


def _config(tmp_path, **report):
    return {
        "model": {"path": str(tmp_path), "task": "causal_lm"},
        "data": {"train": str(tmp_path / "d.jsonl"), "format": "instruction"},
        "adapter": {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
        "training": {"max_steps": 1},
        "report": report,
    }


def test_the_report_section_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="report.to.0.*'tensorboard', 'mlflow', 'wandb' or 'trackio'"):
        validate_config(_config(tmp_path, to=["comet"]))
    with pytest.raises(ConfigError, match="names a tracker twice"):
        validate_config(_config(tmp_path, to=["wandb", "wandb"]))
    with pytest.raises(ConfigError, match="report.*projects"):
        validate_config(_config(tmp_path, projects="x"))
    cfg = validate_config(_config(tmp_path, to=["mlflow"], project="exp"))
    assert cfg.report.to == ["mlflow"] and cfg.report.artifacts and cfg.report.dir is None


def test_a_missing_tracker_extra_is_named_with_its_pip_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        MissingExtraError, match=r"report.to: wandb needs wandb: pip install 'deltatune\[wandb\]'"
    ):
        require_trackers(["wandb"])
