"""`deltatune sweep` end to end on the tiny BERT: real trainer processes, a real SQLite study. Failed trials keep
their reason and the sweep goes on; pruned trials stop early; SIGKILL then --resume repeats no finished trial;
Ctrl-C ends after the running trial is recorded; two processes share one study; best/ follows the rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from train_helpers import classification_config, sentiment_rows, write_config, write_jsonl

from deltatune.cli.main import main
from deltatune.sweep import (
    BestRule,
    Sweep,
    SweepError,
    SweepSettings,
    choose_best,
    load_base_config,
    parse_space,
)
from deltatune.sweep.trial import _failure_reason
from deltatune.sweep.worker import TRAINER_PID_FILE, classify_failure

LR_SPACE = {"optim.lr": {"float": [2e-3, 1e-2], "log": True}, "adapter.r": {"int": [2, 8]}}


@pytest.fixture()
def base(tiny_bert, tmp_path) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(400, 0))
    raw = classification_config(tiny_bert, {"train": str(data)}, tmp_path / "run")
    raw["eval"]["every"] = 100
    return write_config(tmp_path / "base.yaml", raw)


def _space(tmp_path: Path, spec: dict) -> Path:
    return write_config(tmp_path / "space.yaml", spec)


def _study(out: Path, name: str = "deltatune-sweep") -> optuna.Study:
    # a reader that creates no tables and runs no migration check: it must not hold the sweep's writes up
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{(out / 'study.db').resolve()}", skip_compatibility_check=True, skip_table_creation=True
    )
    return optuna.load_study(study_name=name, storage=storage)


def _sweep_process(*args: str, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # inherited by its trials
    return subprocess.Popen(
        [sys.executable, "-m", "deltatune", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_for(condition, timeout: float = 1200.0, what: str = "condition"):
    """Poll until `condition()` gives a value; `timeout` is a hang guard, never a verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()) is not None:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _training_trial(out: Path, need_complete: int):
    """A RUNNING trial whose trainer has started writing metrics, once `need_complete` trials are complete."""
    if not (out / "study.db").exists():
        return None
    try:
        trials = _study(out).get_trials(deepcopy=False)
    except Exception:  # the study is being created
        return None
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        folder = t.user_attrs.get("trial_dir")
        if (
            t.state == optuna.trial.TrialState.RUNNING
            and folder
            and (Path(folder) / "metrics.jsonl").exists()
        ):
            return t if done >= need_complete else None
    return None


def _processes_running(config: Path) -> list[int]:
    """The trial's trainer (the pid it wrote beside its config), if that process is alive and not a zombie."""
    pid_file = config.parent / TRAINER_PID_FILE
    if not pid_file.exists():
        return []
    pid = int(pid_file.read_text())
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return []
    return [] if state == "Z" else [pid]


@pytest.mark.slow
def test_sweep_finds_a_good_adapter_and_best_follows_the_rule(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", str(base), "--space", str(_space(tmp_path, LR_SPACE)), "--trials", "4", "--jobs", "2",
               "--out", str(out), "--tolerance", "0.05"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "trials.json").read_text())
    rows = summary["trials"]
    assert [r["state"] for r in rows] == ["complete"] * 4 and summary["counts"]["complete"] == 4
    for row in rows:  # the study's numbers are the trainer's own
        trained = json.loads((Path(row["trial_dir"]) / "summary.json").read_text())
        assert (
            row["metric"] == trained["best_metric"] and row["trainable_params"] == trained["trainable_params"]
        )
        assert row["adapter_bytes"] == (Path(row["adapter_dir"]) / "adapter_model.safetensors").stat().st_size
        assert not (
            Path(row["trial_dir"]) / "checkpoints"
        ).exists()  # a finished trial keeps only its adapter
        config = json.loads((Path(row["adapter_dir"]) / "deltatune.json").read_text())["training_config"]
        assert (
            config["optim"]["lr"] == row["params"]["optim.lr"]
            and config["adapter"]["r"] == row["params"]["adapter.r"]
        )
    best = choose_best(rows, "max", BestRule("smallest", tolerance=0.05))
    assert summary["best_trial"] == best["number"]
    assert best["metric"] > 0.8  # chance is 0.5; every lr in the range learns the rule (measured 0.9-1.0)
    record = json.loads((out / "best" / "deltatune.json").read_text())
    assert record["sweep"]["trial"] == best["number"] and record["sweep"]["params"] == best["params"]
    assert record["sweep"]["study"] == "deltatune-sweep" and "sqlite" in record["sweep"]["storage"]
    # best/ is a working adapter: it loads onto the base and classifies like the trial's own folder
    from deltatune.classification import Classifier

    texts = ["the movie was great", "my phone is awful", "so sad today"]
    config_raw = load_base_config(base)
    got = Classifier(config_raw["model"]["path"], out / "best")(texts)
    want = Classifier(config_raw["model"]["path"], best["adapter_dir"])(texts)
    assert got == want
    from deltatune.core.inspect import describe_adapter

    assert f"sweep: trial {best['number']} of study 'deltatune-sweep'" in describe_adapter(out / "best")
    for name in ("trials.csv", "sweep.md", "front.png", "params.png"):
        assert (out / name).stat().st_size > 0
    assert f"**best/** is trial {best['number']}" in (out / "sweep.md").read_text()
    assert "best/: trial" in capsys.readouterr().out


@pytest.mark.slow
def test_failed_trials_keep_their_reason_and_the_sweep_goes_on(base, tmp_path):
    space = {"case": {"presets": {
        "ok": {"optim.lr": 3e-3},
        "diverges": {"optim.lr": 1e30, "optim.name": "sgd", "optim.max_grad_norm": None},
        "no_data": {"data.train": str(tmp_path / "missing.jsonl")},
    }}}  # fmt: skip
    settings = SweepSettings(
        config=load_base_config(base, ["training.max_steps=40", "eval.every=20"]),
        space=parse_space(space),
        out=tmp_path / "s",
        trials=3,
    )
    sweep = Sweep(settings)
    sweep.open_study()
    for case in ("diverges", "no_data", "ok"):
        sweep.study.enqueue_trial({"case": case})
    lines = []
    best = sweep.run(log=lines.append)
    rows = {r["params"]["case"]: r for r in sweep.rows()}
    assert rows["diverges"]["state"] == "failed"
    assert rows["diverges"]["reason"].startswith("diverged: training loss (sft objective) is nan at step")
    assert rows["no_data"]["state"] == "failed" and "missing.jsonl" in rows["no_data"]["reason"]
    assert rows["ok"]["state"] == "complete" and best["number"] == rows["ok"]["number"]
    assert any("trial 0 failed" in line and "diverged" in line for line in lines)


def test_failure_kinds_are_named():
    assert classify_failure(MemoryError("boom"))[0] == "out_of_memory"
    assert (
        classify_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))[0] == "out_of_memory"
    )
    assert classify_failure(ValueError("bad"))[0] == "error"
    assert (
        _failure_reason(Path("/nonexistent"), -signal.SIGKILL)
        == "killed by SIGKILL (often the out-of-memory killer)"
    )


@pytest.mark.slow
def test_a_pruned_trial_stops_its_trainer_early(base, tmp_path, monkeypatch):
    monkeypatch.setattr("deltatune.sweep.study.HEARTBEAT_S", 0.0)  # a heartbeat every poll
    config = load_base_config(base, ["training.max_steps=20000", "eval.every=10"])
    never_good_enough = optuna.pruners.ThresholdPruner(lower=2.0)  # accuracy is never >= 2: prune at once
    settings = SweepSettings(config=config, space=parse_space({"optim.lr": {"choices": [3e-3]}}),
                             out=tmp_path / "s", trials=1, pruner=never_good_enough)  # fmt: skip
    sweep = Sweep(settings)
    assert sweep.run(log=lambda line: None) is None
    (row,) = sweep.rows()
    assert row["state"] == "pruned"
    folder = Path(row["trial_dir"])
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 20000 and not (folder / "summary.json").exists()
    assert sweep.study.trials[0].intermediate_values  # the pruner was fed the evaluations
    assert not _processes_running(folder / "trial.yaml")
    (trial,) = sweep.study.trials  # the worker said it was alive while the trainer ran: a heartbeat
    # written after the trial's config (which the trainer starts from), not only the one written when it was asked
    assert trial.user_attrs["heartbeat"] >= (folder / "trial.yaml").stat().st_mtime


@pytest.mark.slow
def test_sigkill_then_resume_repeats_no_finished_trial(base, tmp_path):
    out, space = tmp_path / "s", _space(tmp_path, LR_SPACE)
    args = [str(base), "--space", str(space), "--trials", "2", "--out", str(out)]
    first = _sweep_process(*args)
    try:
        running = _wait_for(lambda: _training_trial(out, need_complete=1), what="a second trial training")
        first.kill()
        first.wait(600)
    finally:
        first.kill()
    trial_config = Path(running.user_attrs["trial_dir"]) / "trial.yaml"
    _wait_for(
        lambda: True if not _processes_running(trial_config) else None, 300, "the orphaned trainer to die"
    )
    assert not (trial_config.parent / "summary.json").exists()  # it died with the sweep, not at its end
    finished = {t.number: t for t in _study(out).trials if t.state == optuna.trial.TrialState.COMPLETE}
    stamps = {
        n: (Path(t.user_attrs["trial_dir"]) / "summary.json").stat().st_mtime_ns for n, t in finished.items()
    }

    without_flag = _sweep_process(*args)
    assert without_flag.wait(600) == 2 and "pass --resume" in without_flag.stdout.read()
    resumed = _sweep_process(*args, "--resume")
    log = resumed.communicate(timeout=1800)[0]
    assert resumed.returncode == 0, log
    assert f"re-queued trials [{running.number}]" in log
    trials = _study(out).trials
    states = [t.state for t in trials]
    assert (
        states.count(optuna.trial.TrialState.COMPLETE) == 2 and optuna.trial.TrialState.RUNNING not in states
    )
    killed = trials[running.number]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["interrupted"] is True
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == running.number]
    assert retry.params == killed.params and retry.state == optuna.trial.TrialState.COMPLETE
    for number, stamp in stamps.items():  # finished trials were not trained again
        assert (Path(finished[number].user_attrs["trial_dir"]) / "summary.json").stat().st_mtime_ns == stamp
    rows = json.loads((out / "trials.json").read_text())["trials"]
    assert [r["state"] for r in rows].count("interrupted") == 1


def test_a_second_worker_meets_the_first_writing_the_study_fingerprint(base, tmp_path):
    """Workers starting together: one may find the study's fingerprint half written (one attribute at a
    time). What is there and agrees is not a different sweep; the rest is written. A value that differs is."""
    settings = SweepSettings(config=load_base_config(base, []), space=parse_space(LR_SPACE), out=tmp_path / "s",
                             trials=1)  # fmt: skip
    sweep = Sweep(settings)
    study = optuna.create_study(study_name="deltatune-sweep")
    sweep._check_same_sweep(study)
    whole = dict(study.user_attrs)
    assert set(whole) >= {"config_sha256", "space_sha256", "metric", "multi_objective"}
    half = optuna.create_study(study_name="deltatune-sweep")
    half.set_user_attr("config_sha256", whole["config_sha256"])  # the first worker is this far
    sweep._check_same_sweep(half)
    assert half.user_attrs == whole
    other = optuna.create_study(study_name="deltatune-sweep")
    other.set_user_attr("space_sha256", "0" * 64)
    with pytest.raises(SweepError, match="different space_sha256"):
        sweep._check_same_sweep(other)


@pytest.mark.slow
def test_resume_refuses_a_different_space(base, tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", str(base), "--space", str(_space(tmp_path, LR_SPACE)), "--trials", "1", "--out", str(out),
                 "training.max_steps=20"]) == 0  # fmt: skip
    with pytest.raises(SweepError, match="started with a different space_sha256"):
        Sweep(SweepSettings(config=load_base_config(base, ["training.max_steps=20"]), space=parse_space(
            {"optim.lr": {"float": [1e-3, 1e-2]}}), out=out, trials=2, resume=True)).run()  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_ends_after_the_running_trial_is_recorded(base, tmp_path):
    out = tmp_path / "s"
    sweep = _sweep_process(
        str(base), "--space", str(_space(tmp_path, LR_SPACE)), "--trials", "3", "--out", str(out)
    )
    try:
        _wait_for(lambda: _training_trial(out, need_complete=0), what="the first trial training")
        sweep.send_signal(signal.SIGINT)
        log = sweep.communicate(timeout=1200)[0]
    finally:
        sweep.kill()
    assert sweep.returncode == 128 + signal.SIGINT, log
    assert "interrupted: no new trials" in log
    (trial,) = _study(out).trials  # no new trial started after Ctrl-C
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert json.loads((out / "trials.json").read_text())["counts"]["complete"] == 1


@pytest.mark.slow
def test_two_processes_share_one_study(base, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = _space(tmp_path, LR_SPACE)
    workers = [
        _sweep_process(str(base), "--space", str(space), "--trials", "4", "--storage", storage, "--resume",
                       "--out", str(tmp_path / f"worker{i}"), "training.max_steps=40",
                       threads=1)  # two processes on two cores: oversubscribed torch threads spin
        for i in range(2)
    ]  # fmt: skip
    logs = [w.communicate(timeout=1800)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = optuna.load_study(study_name="deltatune-sweep", storage=storage).trials
    # the total is the study's: 4, or 5 when both workers asked in the same instant
    assert 4 <= len(trials) <= 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["sweep_pid"] for t in trials}) == 2  # both processes did work
    assert {t.user_attrs["sweep_pid"] for t in trials} == {w.pid for w in workers}
    assert os.path.exists(tmp_path / "worker0" / "best" / "deltatune.json")


def test_an_invalid_space_fails_before_anything_is_written(base, tmp_path, capsys):
    space = _space(tmp_path, {"optim.lrr": {"float": [1e-4, 1e-2]}})
    out = tmp_path / "s"
    assert main(["sweep", str(base), "--space", str(space), "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "the trial with optim.lrr=0.0001" in err
    assert not out.exists()  # no study, no folder


def _each_trial_is_a_run_of_one_mlflow_experiment(sweep: Sweep) -> None:
    """report.to in a sweep: the study is the experiment, each trial a run named by its number, in one store
    beside the study, with the trial's settings as its parameters and its objective among its metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(sweep.s.out / 'trackers' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("deltatune-sweep")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"deltatune-sweep-trial-{t.number:04d}" for t in sweep.study.trials}
    for trial in sweep.study.trials:
        run = runs[f"deltatune-sweep-trial-{trial.number:04d}"]
        assert run.info.status == "FINISHED"
        assert int(run.data.params["adapter.r"]) == trial.params["adapter.r"]
        assert float(run.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
        assert run.data.metrics["validation/accuracy"] == pytest.approx(trial.values[0])


@pytest.mark.slow
def test_timeout_starts_no_trial_after_it(base, tmp_path):
    config = load_base_config(base, ["training.max_steps=20"])
    settings = SweepSettings(
        config=config, space=parse_space(LR_SPACE), out=tmp_path / "s", trials=5, timeout_s=1e-6
    )
    sweep = Sweep(settings)
    assert sweep.run(log=lambda line: None) is None and sweep.rows() == []
    settings.timeout_s = None
    settings.trials = 1
    settings.resume = True
    assert Sweep(settings).run(log=lambda line: None)["state"] == "complete"


@pytest.mark.slow
def test_multi_objective_optimises_metric_and_cost_together(base, tmp_path):
    config = load_base_config(base, ["training.max_steps=40", "eval.every=20", "report.to=[mlflow]"])
    settings = SweepSettings(config=config, space=parse_space(LR_SPACE), out=tmp_path / "s", trials=2,
                             multi_objective=True, rule=BestRule(cost="trainable_params"))  # fmt: skip
    sweep = Sweep(settings)
    sweep.run(log=lambda line: None)
    _each_trial_is_a_run_of_one_mlflow_experiment(sweep)
    assert [d.name for d in sweep.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    rows = sweep.rows()  # counts are ints; a classification trial records its majority-class baseline
    assert all(
        isinstance(r["trainable_params"], int) and r["majority_baseline"]["accuracy"] > 0 for r in rows
    )
    for trial in sweep.study.trials:
        trained = json.loads((Path(trial.user_attrs["trial_dir"]) / "summary.json").read_text())
        assert trial.values == [trained["best_metric"], trained["trainable_params"]]
        assert (
            not trial.intermediate_values
        )  # Optuna cannot prune multi-objective trials: nothing is reported


@pytest.mark.slow
def test_sigterm_stops_the_running_trial_and_requeues_it(base, tmp_path):
    out = tmp_path / "s"
    sweep = _sweep_process(str(base), "--space", str(_space(tmp_path, LR_SPACE)), "--trials", "3", "--out", str(out),
                           "training.max_steps=10000000", "eval.every=50")  # fmt: skip
    try:
        running = _wait_for(lambda: _training_trial(out, need_complete=0), what="the first trial training")
        sweep.send_signal(signal.SIGTERM)
        log = sweep.communicate(timeout=1200)[0]  # a hang guard: the trial alone would train for days
    finally:
        sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, log
    assert not _processes_running(Path(running.user_attrs["trial_dir"]) / "trial.yaml")
    stopped, queued = _study(out).trials
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    assert (
        queued.state == optuna.trial.TrialState.WAITING
        and queued.params == {}
        and queued.user_attrs["retry_of"] == 0
    )
    assert queued.system_attrs["fixed_params"] == stopped.params  # --resume trains exactly these again


@pytest.mark.slow
def test_the_final_evaluation_never_prunes(base, tmp_path, monkeypatch):
    """At the last evaluation training is over: a trial the pruner dislikes then still completes. The sweep
    looks at the trainer only when it ends here (no poll in between), so both evaluations are read after it
    exited, and must reach the study all the same (they were lost when a trial outran the poll)."""
    from deltatune.sweep import trial as trial_module

    monkeypatch.setattr(trial_module, "POLL_S", None)  # wait for the process to end, nothing before
    config = load_base_config(base, ["training.max_steps=40", "eval.every=20"])
    settings = SweepSettings(config=config, space=parse_space({"optim.lr": {"choices": [3e-3]}}), out=tmp_path / "s",
                             trials=1, pruner=optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=30))  # fmt: skip
    sweep = Sweep(settings)
    assert sweep.run(log=lambda line: None)["state"] == "complete"
    assert sorted(sweep.study.trials[0].intermediate_values) == [20, 40]  # both reported, neither pruned


@pytest.mark.slow
def test_a_dead_machines_trial_is_requeued_by_a_live_worker(base, tmp_path):
    """Another host's RUNNING trial with a stale heartbeat is taken for dead and redone here; one with a fresh
    heartbeat is left to its machine (and still counts toward the study's total)."""
    settings = SweepSettings(config=load_base_config(base, ["training.max_steps=40"]), space=parse_space(LR_SPACE),
                             out=tmp_path / "s", trials=2, stale_after_s=600)  # fmt: skip
    sweep = Sweep(settings)
    sweep.open_study()
    for beat in (time.time() - 3600, time.time()):  # trial 0: silent for an hour; trial 1: alive
        trial = sweep.study.ask()
        sweep.s.space.sample(trial)
        trial.set_user_attr("host", "another-machine")
        trial.set_user_attr("sweep_pid", 1)
        trial.set_user_attr("heartbeat", beat)
    lines = []
    sweep.run(log=lines.append)
    dead, alive, retry = sweep.study.trials
    assert "re-queued trials [0]: their worker stopped while they ran" in lines
    assert dead.state == optuna.trial.TrialState.FAIL and dead.user_attrs["interrupted"] is True
    assert alive.state == optuna.trial.TrialState.RUNNING  # not ours to judge
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["host"] == sweep.host


@pytest.mark.slow
def test_an_orphan_is_claimed_once(base, tmp_path):
    """Two workers reclaiming the same dead trial: the database's state change decides; one retry is queued."""
    settings = SweepSettings(
        config=load_base_config(base), space=parse_space(LR_SPACE), out=tmp_path / "s", trials=1
    )
    first, second = Sweep(settings), Sweep(settings)
    first.open_study()
    settings.resume = True
    second.open_study()
    trial = first.study.ask()
    first.s.space.sample(trial)
    assert first._mark_interrupted(trial.number, trial.params) is True
    assert second._mark_interrupted(trial.number, trial.params) is False
    states = [t.state for t in first.study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


def test_the_pruner_hears_full_evaluations_not_the_loss_curve(tmp_path):
    from deltatune.sweep.trial import _new_evaluations

    records = [
        {"step": 0, "split": "validation", "loss": 0.9, "loss_only": True},
        {"step": 5, "split": "train", "loss": 0.5},
        {"step": 10, "split": "validation", "loss": 0.4, "loss_only": True},
        {"step": 20, "split": "validation", "loss": 0.3, "accuracy": 0.8},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _new_evaluations(metrics, 0, "loss") == ([(20, 0.3)], 4)
