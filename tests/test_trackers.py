"""logger=…: each tracker's output read back with its own reader equals metrics.json (params, metrics, images, the
guidance trajectory); logging never changes a result's identity and never fails a finished run."""

import csv
import glob
import importlib.util
import json
import logging
import struct

import pytest

from dng_cli import trackers

BASE = ["model=tiny_random", "n_samples=6", "sampler.steps=3", "sampler.batch_size=6", "sampler.progress=false",
        "method=dng"]
if importlib.util.find_spec("mlflow") is None:  # found, not imported: importing it costs ~1 s per xdist worker
    pytest.skip('the tracker tests need mlflow, tensorboard, wandb and aim: pip install -e ".[test]"',
                allow_module_level=True)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    from conftest import compose_cfg
    from dng_cli.commands import evaluate

    root = tmp_path_factory.mktemp("trackers")
    uri = (root / "mlruns").as_uri()
    result = evaluate.run(compose_cfg("evaluate", BASE + ["logger=many_loggers", f"logger.mlflow.tracking_uri={uri}",
                                                        f"logger.aim.repo={root / 'aim'}"]), root / "run")
    return root, uri, result


def test_csv(tracked):
    root, _, result = tracked
    rows = list(csv.DictReader((root / "run" / "csv" / "metrics.csv").open()))
    logged = {r["name"]: float(r["value"]) for r in rows if r["step"] == ""}
    assert logged == trackers.numbers(result) and logged["fid"] == result["fid"]
    series = [float(r["value"]) for r in rows if r["name"] == "guidance_scale_mean"]  # λ_t per step, over samples
    assert len(series) == 3 and sum(series) / 3 == pytest.approx(result["mean_guidance_scale"], rel=1e-6)
    params = json.loads((root / "run" / "csv" / "params.json").read_text())
    assert params["params"]["method.name"] == "dng" and params["tags"]["fingerprint"] == result["fingerprint"]


def test_tensorboard(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, result = tracked
    ea = EventAccumulator(str(root / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert ea.Scalars("fid")[0].value == pytest.approx(result["fid"], rel=1e-6)  # float32 on disk
    assert ea.Scalars("forbidden_rate_ci.1")[0].value == pytest.approx(result["forbidden_rate_ci"][1], rel=1e-6)
    assert [e.step for e in ea.Scalars("posterior_mean")] == [0, 1, 2] and {"samples", "histogram"} <= set(tags["images"])
    assert ea.Images("samples")[0].width > 0
    text = ea.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method.name: dng" in text


def test_mlflow(tracked):
    from mlflow.tracking import MlflowClient

    root, uri, result = tracked
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dng-evaluate")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["fingerprint"] == result["fingerprint"] and run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "dng" and float(run.data.params["n_samples"]) == 6
    assert {k: v for k, v in run.data.metrics.items() if k in trackers.numbers(result)} == trackers.numbers(result)
    history = client.get_metric_history(run.info.run_id, "guidance_scale_mean")
    assert [m.step for m in history] == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "images")} == {"images/samples.png",
                                                                                 "images/histogram.png"}


def test_aim(tracked):
    """Read back with Aim's own SDK. A finished run is not in the repository's index until Aim's indexer runs, so it
    is opened by its hash (read_only=False: from its own chunks, as ``aim runs ls`` lists it)."""
    from aim import Repo, Run
    from aim.storage.context import Context

    root, _, result = tracked
    (run_hash,) = Repo.from_path(str(root / "aim")).list_all_runs()
    run = Run(run_hash=run_hash, repo=str(root / "aim"), read_only=False)
    try:
        assert run.experiment == "dng-evaluate" and run.name == "run"
        assert run["hparams"]["method.name"] == "dng" and run["tags"]["fingerprint"] == result["fingerprint"]
        values = {m.name: m.values.values_list() for m in run.metrics()}
        assert {k: v[0] for k, v in values.items() if k in trackers.numbers(result)} == trackers.numbers(result)
        assert len(values["posterior_mean"]) == 3
        for name in ("samples", "histogram"):
            (image,) = run.get_image_sequence(name, Context({})).values.values_list()
            assert image.to_pil_image().size[0] > 0
    finally:
        run.close()


def wandb_records(path):
    """The protobuf records of an offline W&B run file (wandb's LevelDB-log format: a 7-byte W&B header, then
    32 KiB blocks of records with a 7-byte header each: crc, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind == 2 else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline(tracked):
    root, _, result = tracked
    (path,) = glob.glob(str(root / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["method.name"] == "dng" and config["n_samples"] == 6 and run.display_name == "run"
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert history["fid"] == pytest.approx(result["fid"]) and history["kl_kept"] == pytest.approx(result["kl_kept"])
    assert history["samples/_type"] == "image-file" and history["guidance_scale_mean_series/nrows"] == 3


def test_logging_changes_no_identity_and_a_failing_tracker_fails_no_run(compose, tmp_path, monkeypatch, caplog):
    from dng_cli.commands import evaluate

    plain = evaluate.run(compose("evaluate", BASE), tmp_path / "plain")

    def broken(self, cfg, params, tags):
        raise RuntimeError("disk quota exceeded\nsecond line")

    monkeypatch.setattr(trackers.Run, "_start_tensorboard", broken)
    with caplog.at_level(logging.WARNING, logger="dng_cli.trackers"):
        logged = evaluate.run(compose("evaluate", BASE + ["logger=[csv,tensorboard]"]), tmp_path / "logged")
    assert logged["fingerprint"] == plain["fingerprint"] and (tmp_path / "logged" / "metrics.json").is_file()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dng_cli.trackers"]
    assert "logger tensorboard could not start (RuntimeError: disk quota exceeded)" in line and "result is saved" in line
    assert (tmp_path / "logged" / "csv" / "metrics.csv").is_file()  # the other tracker still logged


def test_a_missing_package_is_one_line_naming_the_extra(compose, tmp_path, monkeypatch, caplog):
    import sys

    from dng_cli.commands import evaluate

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="dng_cli.trackers"):
        evaluate.run(compose("evaluate", BASE + ["logger=mlflow", f"logger.mlflow.tracking_uri={tmp_path.as_uri()}"]),
                     tmp_path / "run")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dng_cli.trackers"]
    assert 'pip install -e ".[mlflow]"' in line


def test_a_compare_is_a_parent_run_with_its_grid_points_as_children(compose, tmp_path):
    from mlflow.tracking import MlflowClient

    from dng_cli.commands import compare

    uri = (tmp_path / "mlruns").as_uri()
    cfg = compose("compare", ["model=tiny_random", "methods=[np,dng]", "targets=[0.5]", "n_samples=4", "pilot_n=4",
                              "sampler.steps=2", "max_probes=3", "bootstrap=20", "grid_extend=0", "grid_rates=[1.0]",
                              "sampler.progress=false", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"])
    summary = compare.run(cfg, tmp_path / "cmp")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dng-compare-cmp")
    found = client.search_runs([exp.experiment_id])
    parent = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and children and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
                                                 for r in children)
    claim = summary["claims"][0]
    key = f"{claim['metric']}.{claim['method']}-{claim['reference']}.t{claim['target']:g}.diff"
    assert parent[0].data.metrics[key] == pytest.approx(claim["diff"])
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id)} >= {"compare.md"}


def test_training_logs_loss_ema_and_lr_per_step(compose, tiny_mnist, tmp_path):
    """dng train ddpm/classifier with logger=csv: the loss, its EMA and the LR every log_every steps, read back."""
    from dng_cli.commands import train

    out = tmp_path / "ddpm"
    cfg = compose("train_ddpm", [f"dataset.root={tiny_mnist}", "model=tiny_random", "steps=6", "log_every=2",
                                 "batch_size=8", "checkpoint_every=6", "progress=false", f"output_dir={out}",
                                 "logger=csv"])
    train.run_ddpm(cfg, out)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    steps = {name: [int(r["step"]) for r in rows if r["name"] == name] for name in ("loss", "loss_ema", "lr")}
    assert steps == {"loss": [2, 4, 6], "loss_ema": [2, 4, 6], "lr": [2, 4, 6]}
    assert all(float(r["value"]) > 0 for r in rows)
    params = json.loads((out / "csv" / "params.json").read_text())["params"]
    assert params["steps"] == 6 and not any(k.startswith("logger") for k in params)

    out = tmp_path / "clf"
    cfg = compose("train_classifier", [f"dataset.root={tiny_mnist}", "epochs=1", "batch_size=16", "width=4",
                                       "log_every=1", "progress=false", f"output_dir={out}", "logger=csv"])
    result = train.run_classifier(cfg, out)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert [r for r in rows if r["name"] == "loss"] and float(
        [r for r in rows if r["name"] == "test_accuracy"][0]["value"]) == pytest.approx(result["test_accuracy"])
