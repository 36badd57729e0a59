"""The real trackers (report.to), each read back with its own reader: TensorBoard's event accumulator,
MlflowClient, W&B's offline run files (its protobuf records; the framing is LevelDB's log format), Trackio's
local SQLite store. A tiny run logs to all four at once; what they hold must be what metrics.jsonl holds."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import causal_config, instruction_rows, write_jsonl

from deltatune.trackers import tensorboard_tracker
from deltatune.train import train, validate_config

pytestmark = pytest.mark.slow
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(80, 0))


def _config(model, data, out, report, **training):
    raw = causal_config(model, data, out, **{"max_steps": 6, "log_every": 1, **training})
    raw["eval"] = {"every": 3, "batch_size": 8}
    raw["report"] = report
    return validate_config(raw)


def _jsonl(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the trackers key it: split/name -> step -> value."""
    series: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "split") and not isinstance(value, bool):
                series.setdefault(f"{record['split']}/{key}", {})[record["step"]] = value
    return series


@pytest.fixture(scope="module")
def all_four(tiny_causal_lm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_config(tiny_causal_lm, data, out, {"to": ALL, "project": "tiny"}))
    assert not [str(w.message) for w in caught if "report.to" in str(w.message)]  # every tracker kept up
    assert set(json.loads((out / "trackers.json").read_text())) == set(ALL)
    return out, result


def _close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys()
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-6), step


def test_tensorboard_holds_every_scalar_and_the_texts(all_four):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = all_four
    events = EventAccumulator(
        str(out / "trackers" / "tensorboard" / "run"), size_guidance={"scalars": 0, "tensors": 0}
    )
    events.Reload()
    want = _jsonl(out)
    assert set(events.Tags()["scalars"]) == set(want)
    for key, series in want.items():
        _close({e.step: e.value for e in events.Scalars(key)}, series)
    texts = {
        tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
    }
    assert set(texts) >= {
        "config/text_summary",
        "data/text_summary",
        "provenance/text_summary",
        "status/text_summary",
    }
    assert '"max_steps": 6' in texts["config/text_summary"] and '"examples"' in texts["data/text_summary"]
    assert texts["status/text_summary"] == "finished"


def test_mlflow_holds_metrics_params_artifacts_and_the_outcome(all_four):
    from mlflow.tracking import MlflowClient

    out, result = all_four
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'trackers' / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    want = _jsonl(out)
    assert set(run.data.metrics) == set(want)
    for key, series in want.items():
        _close({m.step: m.value for m in client.get_metric_history(run_id, key)}, series)
    assert run.data.params["training.max_steps"] == "6" and run.data.params["adapter.method"] == "lora"
    files = {a.path for a in client.list_artifacts(run_id)}
    assert files >= {"config.json", "data_summary.json", "summary.json", "provenance.json", "adapter"}
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/deltatune.json",
    } <= adapter
    local = Path(client.download_artifacts(run_id, "adapter"))
    kept = load_file(result.saved_to / "adapter_model.safetensors")
    logged = load_file(local / "adapter_model.safetensors")
    assert kept.keys() == logged.keys() and all((kept[k] == logged[k]).all() for k in kept)
    provenance = json.loads(Path(client.download_artifacts(run_id, "provenance.json")).read_text())
    assert provenance == json.loads((result.saved_to / "deltatune.json").read_text())


def _wandb_records(path: Path):
    """The records of a .wandb file, parsed by W&B's own protobuf definitions. The file is LevelDB's log
    format behind a 7-byte header: 32 KiB blocks of chunks, each a 7-byte header (crc32c, length, type:
    1 full, 2 first, 3 middle, 4 last) and its bytes; a block's tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zero fill at the end of a block written short
            pos += block - pos % block
            continue
        chunk = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_files_hold_the_history_config_summary_and_artifact(all_four):
    out, result = all_four
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    [folder] = (out / "trackers" / "wandb").glob(f"offline-run-*-{run_id}")
    [stream] = folder.glob("*.wandb")
    history: dict[str, dict[int, float]] = {}
    config, summary, artifacts, exits = {}, {}, [], []

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in _wandb_records(stream):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {key(i): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step")
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[step] = value
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {key(i): json.loads(i.value_json) for i in updates}
        elif kind == "summary":
            summary |= {key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    want = _jsonl(out)
    assert set(history) == set(want)
    for name, series in want.items():
        _close(history[name], series)
    [artifact] = artifacts
    assert artifact.name == "run-adapter" and artifact.type == "model"
    assert {"adapter_model.safetensors", "adapter_config.json", "deltatune.json"} <= {
        e.path for e in artifact.manifest.contents
    }
    assert config["training"]["max_steps"] == 6 and config["adapter"]["method"] == "lora"
    assert summary["status"] == "finished" and summary["data"]["examples"]["train"] > 0
    assert summary["provenance"]["metrics"]["step"] == result.best_step
    assert exits == [0]


def test_trackio_local_store_holds_the_metrics_and_the_config(all_four):
    from trackio.sqlite_storage import SQLiteStorage

    out, _ = all_four
    logs = SQLiteStorage.get_logs("tiny", "run")
    history: dict[str, dict[int, float]] = {}
    for row in logs:
        for key, value in row.items():
            if "/" in key:
                history.setdefault(key, {})[row["step"]] = value
    want = _jsonl(out)
    assert set(history) == set(want)
    for key, series in want.items():
        _close(history[key], series)
    config = SQLiteStorage.get_run_config("tiny", "run")
    assert config["training"]["max_steps"] == 6 and config["data_summary"]["examples"]["train"] > 0
    [artifact] = SQLiteStorage.get_artifacts("tiny")
    assert artifact["name"] == "run-adapter" and artifact["type"] == "model"
    manifest = SQLiteStorage.get_artifact_manifest("tiny", "run-adapter", None)
    assert {"adapter_model.safetensors", "adapter_config.json", "deltatune.json"} <= _paths(manifest)


def _paths(manifest) -> set[str]:
    """The file names a Trackio artifact manifest lists, wherever its version nests them."""
    found: set[str] = set()
    if isinstance(manifest, dict):
        for key, value in manifest.items():
            if key == "path" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[-1])
            found |= _paths(value)
    elif isinstance(manifest, list):
        for value in manifest:
            found |= _paths(value)
    return found


def test_a_resumed_run_continues_its_tracker_runs_and_tensorboard_hides_redone_steps(
    tiny_causal_lm, data, tmp_path
):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    report = {"to": ["tensorboard", "mlflow"]}
    train(_config(tiny_causal_lm, data, out, report, checkpoint_every=4))
    first = json.loads((out / "trackers.json").read_text())
    last = max((out / "checkpoints").iterdir())
    assert last.name.endswith("6")
    shutil.rmtree(
        last
    )  # as if killed after step 6 was logged, before its checkpoint: steps 5 and 6 are redone
    train(_config(tiny_causal_lm, data, out, report, checkpoint_every=4), resume=True)
    assert json.loads((out / "trackers.json").read_text()) == first
    want = _jsonl(out)
    events = EventAccumulator(str(out / "trackers" / "tensorboard" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    for key, series in want.items():  # steps 5 and 6 once each: the first attempt's were purged
        _close({e.step: e.value for e in events.Scalars(key)}, series)
        assert len(events.Scalars(key)) == len(series)
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'trackers' / 'mlflow.db').resolve()}")
    assert client.get_run(first["mlflow"]).info.status == "FINISHED"
    history = client.get_metric_history(first["mlflow"], "train/loss")
    latest = {
        m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)
    }  # MLflow appends, never drops
    _close(latest, want["train/loss"])


def test_a_tracker_failing_mid_run_never_changes_or_stops_training(
    tiny_causal_lm, data, tmp_path, monkeypatch
):
    plain = train(_config(tiny_causal_lm, data, tmp_path / "plain", {}))
    real_log = tensorboard_tracker.TensorBoardTracker.log

    def disk_full_at_step_3(self, step, metrics):
        if step == 3:
            raise OSError(28, "No space left on device")
        real_log(self, step, metrics)

    monkeypatch.setattr(tensorboard_tracker.TensorBoardTracker, "log", disk_full_at_step_3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reported = train(_config(tiny_causal_lm, data, tmp_path / "reported", {"to": ["tensorboard"]}))
    said = [str(w.message) for w in caught if "report.to" in str(w.message)]
    assert said == [
        "report.to: tensorboard failed at step 3 (OSError: [Errno 28] No space left on device); training goes "
        "on without it"
    ]
    assert reported.steps == plain.steps == 6
    a, b = (
        load_file(plain.saved_to / "adapter_model.safetensors"),
        load_file(reported.saved_to / "adapter_model.safetensors"),
    )
    assert all((a[k] == b[k]).all() for k in a)
    for key in ("train/loss", "validation/loss"):  # the whole curve was still written, and is the same
        assert _jsonl(tmp_path / "reported")[key] == pytest.approx(_jsonl(tmp_path / "plain")[key], rel=1e-6)
