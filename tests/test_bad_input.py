"""Every bad input the README promises to handle: one stderr line naming the value, a non-zero exit,
no traceback, and nothing left on disk (no run folder, no empty outputs/<command>/)."""

import os

import pytest
import torch

from dng_cli import cli

T = ["model=tiny_random"]  # sample/evaluate cases need no trained weights to be refused
CASES = [
    # --- method values
    ("evaluate", T + ["method=foo"], "'foo'"),
    ("evaluate", T + ["forbidden=[10]"], "10"),
    ("evaluate", T + ["method.forbidden=[6]"], "top-level key forbidden"),
    ("evaluate", T + ["forbidden=[-1]"], "-1"),
    ("evaluate", T + ["forbidden=[0,0]"], "given twice"),
    ("evaluate", T + ["forbidden=[]"], "forbidden=[]"),
    ("evaluate", T + ["method=np", "forbidden=[0,1,2,3,4,5,6,7,8,9]"], "forbids every class"),
    ("evaluate", T + ["forbidden=[a]"], "'a'"),
    ("evaluate", T + ["method.p_max=1.0"], "p_max=1.0"),
    ("evaluate", T + ["method.p_max=1e-7"], "p_max"),
    ("evaluate", T + ["method.p_max=abc"], "p_max='abc'"),
    ("evaluate", T + ["method.p_min=0"], "p_min"),
    ("evaluate", T + ["method.prior=0"], "prior=0"),
    ("evaluate", T + ["method.prior=1.5"], "prior=1.5"),
    ("evaluate", T + ["method.prior=abc"], "prior='abc'"),
    ("evaluate", T + ["method.temperature=-1"], "temperature=-1"),
    ("evaluate", T + ["method.temperature=abc"], "temperature='abc'"),
    ("evaluate", T + ["method.offset=abc"], "offset='abc'"),
    ("evaluate", T + ["method.offset=inf"], "offset=inf"),
    ("evaluate", T + ["method.guidance_scale=abc"], "guidance_scale='abc'"),
    ("evaluate", T + ["method.guidance_scale=-1"], "guidance_scale=-1"),
    ("evaluate", T + ["method.guidance_scale=nan"], "guidance_scale=nan"),
    ("evaluate", T + ["method=np", "method.guidance_scale=-0.5"], "guidance_scale=-0.5"),
    ("evaluate", T + ["method=np", "method.guidance_scale=true"], "guidance_scale=True"),
    ("evaluate", T + ["method=sld", "method.threshold=abc"], "threshold='abc'"),
    ("evaluate", T + ["method=sld", "method.momentum_beta=1"], "momentum_beta=1"),
    ("evaluate", T + ["method=sld", "method.momentum_beta=abc"], "momentum_beta='abc'"),
    ("evaluate", T + ["method=sld", "method.scale=-1"], "scale=-1"),
    ("evaluate", T + ["method=sld", "method.momentum_scale=-1"], "momentum_scale=-1"),
    ("evaluate", T + ["method=sld", "method.warmup_steps=-1"], "warmup_steps=-1"),
    ("evaluate", T + ["method=sld", "method.warmup_steps=1.5"], "warmup_steps=1.5"),
    ("evaluate", T + ["method=dng", "method.update_variance=huge"], "huge"),
    ("evaluate", T + ["method=dng_fewstep", "forbidden=[0,6,8]"], "3 forbidden classes"),
    ("evaluate", T + ["method=dng", "method.prior=0.2", "forbidden=[0,1,2,3,4]"], "5 forbidden classes"),
    ("evaluate", T + ["method=np", "method.p_max=0.5"], "p_max"),
    # --- an override Hydra's grammar cannot read: which one, and how to quote it
    ("evaluate", T + ["model.path=naïve"], "override 'model.path=naïve' cannot be read"),
    ("evaluate", ["-m", *T, "method.guidance_scale=1,2", "sampler.device=ü"], "'sampler.device=\"ü\"'"),
    # --- sizes and seeds: refused before anything is allocated
    ("evaluate", T + ["n_samples=1000000000"], "n_samples=1000000000 needs"),
    ("evaluate", T + ["seed=9223372036854775807"], "seed=9223372036854775807"),
    ("evaluate", T + ["sampler.seed=9223372036854775807"], "sampler.seed=9223372036854775807 with n_samples="),
    ("evaluate", T + ["sampler.seed=9223372036854775808"], "sampler.seed=9223372036854775808 is invalid: it must be <"),
    ("evaluate", T + ["seed=9223372036854775000", "n_samples=2000"], "runs past 2^63"),
    ("calibrate", T + ["pilot_seed=9223372036854775800", "pilot_n=300"], "runs past 2^63"),
    # --- sampler values
    ("evaluate", T + ["sampler.steps=0"], "steps=0"),
    ("evaluate", T + ["sampler.steps=1001"], "steps=1001"),
    ("evaluate", T + ["sampler.steps=abc"], "steps='abc'"),
    ("evaluate", T + ["sampler.steps=2.5"], "steps=2.5"),
    ("evaluate", T + ["sampler.variance=medium"], "medium"),
    ("evaluate", T + ["sampler.max_batch=0"], "max_batch=0"),
    ("evaluate", T + ["sampler.max_batch=abc"], "max_batch='abc'"),
    ("evaluate", T + ["sampler.compile=maybe"], "compile='maybe'"),
    ("evaluate", T + ["sampler.channels_last=2"], "channels_last=2"),
    ("evaluate", T + ["sampler.progress=abc"], "progress='abc'"),
    ("evaluate", T + ["sampler.device=foo"], "device='foo'"),
    ("evaluate", T + ["sampler.device=cuda:x"], "device='cuda:x'"),
    ("evaluate", T + ["sampler.num_threads=-1"], "num_threads=-1"),
    ("evaluate", T + ["sampler.num_threads=0"], "num_threads=0"),
    ("evaluate", T + ["sampler.num_threads=abc"], "num_threads='abc'"),
    ("evaluate", T + ["sampler.batch_size=0"], "batch_size=0"),
    ("evaluate", T + ["sampler.batch_size=abc"], "batch_size='abc'"),
    ("evaluate", T + ["sampler.seed=-1"], "seed=-1"),
    ("evaluate", T + ["sampler.beta_start=0"], "beta_start"),  # the schedule is the model's (scheduler_config.json)
    ("evaluate", T + ["+model.scheduler.beta_schedule=sigmoid"], "beta_schedule='sigmoid'"),
    ("evaluate", T + ["+model.scheduler.prediction_type=flow"], "prediction_type='flow'"),
    # --- run values
    ("evaluate", T + ["n_samples=0"], "n_samples=0"),
    ("evaluate", T + ["n_samples=-3"], "n_samples=-3"),
    ("evaluate", T + ["n_samples=abc"], "n_samples='abc'"),
    ("evaluate", T + ["n_samples=1.5"], "n_samples=1.5"),
    ("evaluate", T + ["seed=1.5"], "seed=1.5"),
    ("evaluate", T + ["seed=-1"], "seed=-1"),
    ("evaluate", T + ["seed=abc"], "seed='abc'"),
    ("evaluate", T + ["skip_existing=maybe"], "skip_existing='maybe'"),
    ("evaluate", T + ["overwrite=2"], "overwrite=2"),
    ("evaluate", T + ["no_such_key=1"], "no_such_key"),
    ("evaluate", T + ["--no_such_key=1"], "no_such_key"),
    ("evaluate", T + ["--method=foo"], "'foo'"),
    # --- models, data, metrics
    ("evaluate", ["model=foo"], "'foo'"),
    ("evaluate", ["model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ("evaluate", T + ["model.classifier=/nonexistent/clf"], "/nonexistent/clf"),
    ("evaluate", ["model=pair"], "has no value"),
    ("evaluate", ["model=cifar10", "dataset=cifar10"], "has no value"),
    ("evaluate", ["dataset=foo"], "'foo'"),
    ("evaluate", ["dataset=cifar10"], "does not fit dataset=cifar10"),
    ("evaluate", T + ["dataset=cifar10"], "does not fit dataset=cifar10"),
    ("evaluate", ["dataset=mnist", "dataset.num_classes=5"], "does not fit"),
    ("evaluate", ["model.classifier=fashion_mnist"], "trained on fashion_mnist, not on dataset=mnist"),
    ("sample", ["model=fashion_mnist"], "trained on fashion_mnist, not on dataset=mnist"),
    ("evaluate", T + ["metrics.fid.features=foo"], "features='foo'"),
    ("evaluate", T + ["metrics.fid.split=val"], "split='val'"),
    ("evaluate", T + ["metrics.kl_smoothing=0"], "kl_smoothing=0"),
    ("evaluate", T + ["metrics.kl_smoothing=abc"], "kl_smoothing='abc'"),
    ("evaluate", T + ["launcher=foo"], "'foo'"),
    ("evaluate", T + ["experiment=foo"], "'foo'"),
    # --- sweeps: checked up front, job by job
    ("evaluate", T + ["-m", "n_samples=-3"], "n_samples=-3"),
    ("evaluate", T + ["-m", "foo=1,2"], "foo"),
    ("evaluate", T + ["-m", "method.guidance_scale=1,abc"], "'abc'"),
    ("evaluate", T + ["-m", "experiment=mnist_paper", "n_samples=0"], "n_samples=0"),
    ("evaluate", T + ["-m", "sampler.steps=0,10"], "steps=0"),
    ("evaluate", T + ["-m", "method=np,foo"], "'foo'"),
    ("evaluate", T + ["-m", "method=dng", "method.p_max=0.5,2.0"], "p_max=2.0"),
    # --- dng sample
    ("sample", T + ["method.p_max=2"], "p_max=2"),
    ("sample", T + ["n_samples=0"], "n_samples=0"),
    ("sample", T + ["sampler.device=foo"], "device='foo'"),
    ("sample", T + ["seed=1.5"], "seed=1.5"),
    ("sample", ["model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ("sample", T + ["forbidden=[11]"], "11"),
    # --- dng train
    ("train", ["ddpm", "steps=0"], "steps=0"),
    ("train", ["ddpm", "steps=abc"], "steps='abc'"),
    ("train", ["ddpm", "lr_schedule=linear"], "lr_schedule='linear'"),
    ("train", ["ddpm", "init_from=/nonexistent/ema"], "/nonexistent/ema"),
    ("train", ["ddpm", "batch_size=0"], "batch_size=0"),
    ("train", ["ddpm", "lr=0"], "lr=0"),
    ("train", ["ddpm", "lr=abc"], "lr='abc'"),
    ("train", ["ddpm", "label_dropout=1"], "label_dropout=1"),
    ("train", ["ddpm", "ema_decay=1.5"], "ema_decay=1.5"),
    ("train", ["ddpm", "checkpoint_every=0"], "checkpoint_every=0"),
    ("train", ["ddpm", "resume=maybe"], "resume='maybe'"),
    ("train", ["ddpm", "device=foo"], "device='foo'"),
    ("train", ["ddpm", "num_threads=-2"], "num_threads=-2"),
    ("train", ["ddpm", "conditional=maybe"], "conditional='maybe'"),
    ("train", ["ddpm", "warmup_steps=-1"], "warmup_steps=-1"),
    ("train", ["ddpm", "seed=1.5"], "seed=1.5"),
    ("train", ["ddpm", "dataset=foo"], "'foo'"),
    ("train", ["classifier", "epochs=0"], "epochs=0"),
    ("train", ["classifier", "batch_size=abc"], "batch_size='abc'"),
    ("train", ["classifier", "lr=-1"], "lr=-1"),
    ("train", ["classifier", "width=0"], "width=0"),
    ("train", ["classifier", "device=foo"], "device='foo'"),
    ("train", ["classifier", "shift=-1"], "shift=-1"),
    ("train", [], "train needs a target"),
    ("train", ["foo"], "'foo'"),
    # --- dng data, report, sd, the front
    ("data", ["foo"], "'foo'"),
    ("report", ["/nonexistent/sweep"], "/nonexistent/sweep"),
    ("report", [], "needs a folder"),
    ("sd", ["sd_model=tiny_random"], "prompt has no value"),
    ("sd", ["sd_model=/nonexistent/sd", "prompt=x"], "/nonexistent/sd"),
    ("sd", ["sd_model=tiny_random", "prompt=x", "negative_prompt=", "method=np"], "negative_prompt is empty"),
    ("sd", ["sd_model=tiny_random", "prompt=x", "negative_prompt=y", "sampler.steps=0"], "steps=0"),
    ("sd", ["sd_model=tiny_random", "prompt=x", "negative_prompt=y", "sampler.variance=huge"], "variance='huge'"),
    ("sd", ["sd_model=tiny_random", "prompt=x", "negative_prompt=y", "method=sld_medium", "method.sld_mom_beta=1"],
     "sld_mom_beta=1"),
    ("sd", ["sd_model=tiny_random", "prompt=x", "negative_prompt=y", "cfg_scale=abc"], "cfg_scale='abc'"),
    ("frobnicate", [], "frobnicate"),
]
RUN_DIR_COMMANDS = {"evaluate", "sample", "train", "sd"}


def _one_line_failure(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command,args,match", CASES, ids=[f"{c} {' '.join(a)}" for c, a, _ in CASES])
def test_bad_input(capsys, tmp_path, monkeypatch, command, args, match):
    monkeypatch.chdir(tmp_path)  # anything written to outputs/ would land here
    run_dir = tmp_path / "run"
    extra = []
    if command in RUN_DIR_COMMANDS and args and command != "train" or command == "train" and args[:1] in (["ddpm"], ["classifier"]):
        extra = [f"hydra.sweep.dir={run_dir}" if "-m" in args else f"hydra.run.dir={run_dir}"]
    err = _one_line_failure(capsys, [command, *args, *extra])
    assert match in err, err
    assert not run_dir.exists()
    assert not (tmp_path / "outputs").exists()


def test_at_least_a_hundred_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("where", ["under_a_file", "an_existing_file", "read_only"])
def test_unwritable_output_location(capsys, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = {"under_a_file": blocker / "run", "an_existing_file": blocker, "read_only": tmp_path / "ro" / "run"}[where]
    mounted = False
    if where == "read_only":
        (tmp_path / "ro").mkdir(mode=0o500)
        if os.geteuid() == 0:  # root ignores permission bits: a read-only file system stops it
            import subprocess

            res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp_path / "ro")],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"root writes into read-only folders and no read-only tmpfs can be mounted here: {res.stderr[:80]}")
            mounted = True
    try:
        err = _one_line_failure(capsys, ["evaluate", *T, f"hydra.run.dir={target}"])
    finally:
        if mounted:
            import subprocess

            subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True)
    assert "hydra.run.dir" in err


def test_no_arguments_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2 and "usage: dng" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _one_line_failure(capsys, ["evaluate", *T, "sampler.device=cuda", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "no CUDA device" in err


def test_report_skips_malformed_metrics_with_one_warning_each(tmp_path, capsys):
    import json

    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.json").write_text(json.dumps({
        "method": "np", "forbidden": [0], "forbidden_rate": 0.0, "forbidden_rate_ci": [0.0, 0.1], "kl_uniform": 0.1,
        "kl_uniform_se": 0.01, "steps": 2, "n_samples": 4, "fid": 1.0, "fid_full": 1.0, "images_per_s": 1.0}))
    for name, content in (("list", b"[1, 2]"), ("nokeys", b'{"method": "np"}'), ("latin1", b'{"m": "\xe9"}'),
                          ("badjson", b"{")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_bytes(content)
    (tmp_path / "folder" / "metrics.json").mkdir(parents=True)
    cli.main(["report", str(tmp_path)])
    assert "| np |" in (tmp_path / "report.md").read_text()
    out = capsys.readouterr()
    skipped = [line for line in (out.out + out.err).splitlines() if "skipping" in line]
    assert len(skipped) == 5 and "Traceback" not in out.err, skipped


def test_a_library_logging_handler_never_closes_our_streams(tmp_path):
    """absl (imported by OpenVINO, ONNX Runtime, TensorBoard, …) keeps a handler on the stderr of its import; Hydra's
    logging setup closes every handler, and absl's close() closes a stream that is no longer sys.stderr — under
    pytest's capture that was the capture file, and every later test of the worker errored."""
    import io
    import json

    absl = pytest.importorskip("absl.logging")
    stream = io.StringIO()
    absl.get_absl_handler().python_handler.stream = stream  # as if absl had been imported while this was stderr
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "metrics.json").write_text(json.dumps({
        "method": "np", "forbidden": [0], "forbidden_rate": 0.0, "forbidden_rate_ci": [0.0, 0.1], "kl_uniform": 0.1,
        "kl_uniform_se": 0.01, "steps": 2, "n_samples": 4, "fid": 1.0, "fid_full": 1.0, "images_per_s": 1.0}))
    cli.main(["report", str(tmp_path)])
    assert not stream.closed


@pytest.mark.e2e
def test_ctrl_c_is_one_line_and_leaves_no_lock(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dng_cli.cli", "evaluate", *T, "n_samples=4", "sampler.steps=2",
                             "sampler.progress=false", f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DNG_TEST_PAUSE": "evaluate"},  # waits where sampling starts
                            # a shell's background job (`pytest &`) ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if "DNG_TEST_PAUSED evaluate" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("dng: interrupted; re-run the same command to resume")
    assert "Traceback" not in err
    assert not (run_dir / ".dng.lock").exists() and not (run_dir / "metrics.json").exists()


def test_inception_weights_with_a_code_payload_are_refused_unread(tmp_path):
    import pickle

    from dng_cli import UserError, metrics

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / metrics.INCEPTION_WEIGHTS
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="refusing to load"):
        metrics.feature_network("inception", None, str(path))
    assert not marker.exists()


def test_sd_without_transformers_names_the_extra(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the [sd] extra were not installed
    err = _one_line_failure(capsys, ["sd", "sd_model=tiny_random", "prompt=x", "negative_prompt=y",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert 'pip install -e ".[sd]"' in err and not (tmp_path / "run").exists()


# --- run folders: what a folder on disk can hold; each case one line, and the folder left as it was
def _finished_run(tmp_path):
    run_dir = tmp_path / "run"
    cli.main(["evaluate", *T, "n_samples=3", "sampler.steps=1", "sampler.progress=false", "method=np",
              f"hydra.run.dir={run_dir}"])
    return run_dir


def _edit_metrics(**changes):
    def setup(tmp_path):
        import json

        run_dir = _finished_run(tmp_path)
        m = json.loads((run_dir / "metrics.json").read_text())
        (run_dir / "metrics.json").write_text(json.dumps({**m, **changes} if changes.pop("_merge", True) else changes))
        return run_dir
    return setup


def _only_fingerprint(tmp_path):
    run_dir = _finished_run(tmp_path)
    (run_dir / "metrics.json").write_text('{"fingerprint": 1}')
    return run_dir


def _truncated_samples(tmp_path):
    run_dir = _finished_run(tmp_path)
    data = (run_dir / "samples.npz").read_bytes()
    (run_dir / "samples.npz").write_bytes(data[: len(data) // 2])
    return run_dir


def _wrong_shape_samples(tmp_path):
    import numpy as np

    run_dir = _finished_run(tmp_path)
    with np.load(run_dir / "samples.npz") as f:
        arrays = dict(f)
    arrays["images"] = arrays["images"][:, :, :14]
    np.savez_compressed(run_dir / "samples.npz", **arrays)
    return run_dir


def _symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop" / "run"


def _files(folder):
    try:
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.suffix != ".log"}
    except OSError:  # a path that cannot be a folder
        return None


FOLDER_CASES = [  # (name, setup(tmp_path) -> run dir, extra overrides, match)
    ("symlink loop", _symlink_loop, [], "Symlink loop"),
    ("name over 255 bytes", lambda tmp_path: tmp_path / ("a" * 300), [], "300 bytes, file systems allow 255"),
    ("config not an object", _edit_metrics(config=[1, 2]), ["method=np"], "its config is a list, not an object"),
    ("weights not an object", _edit_metrics(weights="abc"), ["method=np"], "its weights is a str, not an object"),
    ("fingerprint not a string", _only_fingerprint, ["method=np"], "its fingerprint is a int, not a string"),
    ("truncated samples.npz", _truncated_samples, ["method=np", "metrics.kl_smoothing=2"], "samples.npz is unreadable"),
    ("wrong-shape samples.npz", _wrong_shape_samples, ["method=np", "metrics.kl_smoothing=2"], "not uint8 images of shape (1, 28, 28)"),
]


@pytest.mark.parametrize("name,setup,extra,match", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_run_folder(capsys, tmp_path, monkeypatch, name, setup, extra, match):
    monkeypatch.chdir(tmp_path)
    run_dir = setup(tmp_path)
    capsys.readouterr()
    before = _files(run_dir)
    err = _one_line_failure(capsys, ["evaluate", *T, "n_samples=3", "sampler.steps=1", "sampler.progress=false", *extra,
                                     f"hydra.run.dir={run_dir}"])
    assert match in err, err
    assert _files(run_dir) == before
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_a_deleted_working_directory_is_one_line(tmp_path):
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    script = (f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); "
              "from dng_cli import cli; cli.main(['evaluate', 'model=tiny_random'])")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "working directory no longer exists" in res.stderr


def test_report_skips_wrong_types_nulls_and_rates_outside_their_interval(tmp_path, capsys):
    import json

    good = {"method": "np", "forbidden": [0], "forbidden_rate": 0.0, "forbidden_rate_ci": [0.0, 0.1], "kl_uniform": 0.1,
            "kl_uniform_se": 0.01, "steps": 2, "n_samples": 4, "fid": 1.0, "fid_full": 1.0, "images_per_s": 1.0}
    bad = {"string_rate": {"forbidden_rate": "0.1"}, "null_kl": {"kl_uniform": None}, "null_fid_se_ok": {"fid_se": None},
           "outside_ci": {"forbidden_rate": 0.5}, "bool_steps": {"steps": True}, "fid_string": {"fid": "x"},
           "forbidden_str": {"forbidden": "0"}, "hist_str": {"histogram": ["a"]}, "config_list": {"config": [1]}}
    for name, change in {"good": {}, **bad}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**good, **change}))
    cli.main(["report", str(tmp_path)])
    out = capsys.readouterr()
    skipped = [line for line in (out.out + out.err).splitlines() if "skipping" in line]
    assert len(skipped) == len(bad) - 1 and "Traceback" not in out.err, skipped  # a null s.e. is fine
    assert len((tmp_path / "report.csv").read_text().strip().splitlines()) == 1 + 2  # header, good, null_fid_se_ok


def test_report_writes_no_table_when_it_cannot_finish(tmp_path, monkeypatch):
    import json

    from dng_cli import plots

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({
        "method": "np", "forbidden": [0], "forbidden_rate": 0.0, "forbidden_rate_ci": [0.0, 0.1], "kl_uniform": 0.1,
        "steps": 2, "n_samples": 4, "fid_full": 1.0, "images_per_s": 1.0}))

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "pareto_plot", broken)
    with pytest.raises(RuntimeError):
        cli.main(["report", str(tmp_path)])
    assert not (tmp_path / "report.csv").exists() and not (tmp_path / "report.md").exists()


def test_report_on_a_metrics_file_names_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(run / "metrics.json")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "is a file" in err and f"dng report '{run}'" in err, err


@pytest.mark.parametrize("content,match", [
    ("[1, 2", "scheduler_config.json' is not readable JSON (JSONDecodeError)"),
    ('["a"]', "its scheduler_config.json is not a JSON object"),
    ('{"num_train_timesteps": "x"}', "its scheduler_config.json is invalid (ValueError"),
    ('{"trained_betas": "abc"}', "its scheduler_config.json is invalid (TypeError"),
    ('{"beta_schedule": "weird"}', "beta_schedule='weird' is not supported"),
])
def test_an_unreadable_scheduler_config_is_one_line_naming_the_folder_key(capsys, tmp_path, content, match):
    import shutil

    from dng_cli.spec import resolve

    own = tmp_path / "unet"
    shutil.copytree(resolve("mnist", "ddpm"), own)
    (own / "scheduler_config.json").write_text(content)
    err = _one_line_failure(capsys, ["evaluate", f"model.path={own}", "n_samples=2", "sampler.steps=1",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert err.startswith("dng: error: model.path: ") and match in err, err
    assert not (tmp_path / "run").exists()
