import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# torch threads: the cores shared out over pytest-xdist's workers (2 cores, 2 workers: 1 each; one process: 2), the
# same count in every subprocess, launcher job and SLURM job a test starts (they inherit OMP_NUM_THREADS): tests that
# compare an in-process run with a job's need the same thread count, or float reductions differ in the last bits.
# Two workers of 2 threads each oversubscribed 2 cores (docs/performance.md#test-suite).
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
# sampler.precision=auto resolves as on a CPU without native bf16, here and in every subprocess: the suite's results
# do not depend on the machine (tests of auto itself patch spec.native_bf16 or set the variable).
os.environ["DNG_NATIVE_BF16"] = "0"
# sampler.backend=auto resolves to torch, here and in every subprocess, without the once-per-machine benchmark:
# tests of the graph backends name them (tests/test_backends.py), tests of auto set the variable themselves.
os.environ["DNG_AUTO_BACKEND"] = "torch"

REPO = Path(__file__).resolve().parents[1]
SLOW_MODULES = {"test_report_html", "test_faults", "test_sweep", "test_benchmarks", "test_real_models", "test_posterior_exact", "test_slurm",
                "test_own_models", "test_fanout", "test_docs"}
SLOW_TESTS = {"test_compare_end_to_end_on_the_tiny_model", "test_turning_inception_on_rescores_the_saved_samples_without_sampling",
              "test_evaluate_reports_inception_fid_next_to_the_classifier_fid", "test_real_inception_weights_when_installed",
              "test_cli_refusal_keeps_the_folder_consistent", "test_an_a_a_comparison_comes_out_unresolved",
              "test_the_inception_graph_equals_the_torchscript_inception",
              # >= 2.5 s each in `pytest -m "not slow" --durations=25` (2026-12-05): compares, trackers' shared run,
              # daemons' watcher, the diffusers docs example
              "test_compare_grid_existing_reanalyses_without_sampling",
              "test_compare_method_overrides_reach_every_result_and_the_table",
              "test_compare_shares_one_pilot_set_per_method_across_targets",
              "test_compare_logs_each_probe_under_the_compared_methods_name",
              "test_a_compare_is_a_parent_run_with_its_grid_points_as_children",
              "test_the_docs_example_runs_and_tracks_the_posterior", "test_evaluate_reports_kid_beside_inception_fid",
              "test_report_never_puts_two_models_or_seed_sets_on_one_front",
              "test_csv", "test_tensorboard", "test_mlflow", "test_wandb_offline", "test_aim",
              "test_the_watcher_ends_the_daemons_when_their_session_is_killed",
              "test_a_second_process_waits_for_the_cluster_lock_and_gets_it_when_the_holder_dies",
              # >= 1.4 s each in the same listing after the collection was cut from 6.8 s to 3.2 s (issue 43's 60 s)
              "test_compare_bootstraps_kid_from_the_saved_inception_features",
              "test_the_sld_guider_in_a_diffusers_loop_equals_the_sampler",
              "test_training_lowers_the_loss_and_uses_the_null_label",
              "test_calibrate_command_caches_probes_and_refuses_unreachable",
              "test_default_sample_two_steps", "test_fashion_mnist_samples_two_steps_with_its_class_names",
              "test_a_compares_plan_measures_the_backend_it_will_sample_with"}


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): a worker per core, at most 4 (docs/performance.md#test-suite)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """``slow``: every e2e (subprocess) test and the modules above; ``pytest -m "not slow"`` is the
    development subset, the README's ``pytest`` (and CI) runs everything."""
    for item in items:
        if (item.get_closest_marker("e2e") or item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES
                or item.originalname in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def gmm():
    from gmm import GaussianMixtureEps

    # forbidden component 0 sits symmetrically between the two kept ones (weights 0.42 : 0.28)
    return GaussianMixtureEps([[0.0, 1.5], [-2.0, -1.0], [2.0, -1.0]], [0.3, 0.42, 0.28], 0.25)


def compose_cfg(config_name: str, overrides: list[str], return_hydra_config: bool = False):
    from dng_cli.validate import compose

    return compose(config_name, overrides, return_hydra_config)


@pytest.fixture
def compose():
    return compose_cfg


def make_idx_dataset(root: Path, folder: str = "MNIST", n_train: int = 64, n_test: int = 40, seed: int = 0) -> Path:
    """A tiny synthetic dataset in torchvision's MNIST layout (class-dependent blobs, uint8)."""
    import numpy as np

    from dng_cli.data import IDX_FILES, write_idx

    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 6 + 2 * c, 4:24] = 255
        write_idx(raw / IDX_FILES[split][0], images.astype(np.uint8))
        write_idx(raw / IDX_FILES[split][1], labels.astype(np.uint8))
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_idx_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (Debian's ``chromium`` package, no browser download) driven by Python playwright. In CI
    (CI=true) and with DNG_TEST_BROWSER=1, chromium is installed with apt-get when missing (root; tests/apt.py
    serialises it with every other apt-get of the tests); elsewhere the test skips, saying what is missing."""
    import shutil

    ci = os.environ.get("CI") == "true" or os.environ.get("DNG_TEST_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if ci:
            pytest.fail('the report-page test needs playwright: pip install -e ".[test]"')
        pytest.skip('the report-page test needs playwright (pip install -e ".[test]")')
    if shutil.which("chromium") is None:
        if not ci:
            pytest.skip("the report-page test needs Debian's chromium: apt-get install chromium, or set DNG_TEST_BROWSER=1 "
                        "(as root) to install it")
        if os.geteuid() != 0:
            pytest.fail("the report-page test needs chromium: run as root (it is installed with apt-get)")
        import apt

        apt.install(["chromium"], ["chromium"])
    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI runs as root)
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM cluster (tests/slurm_cluster.py) for the session: runs in CI (CI=true) and
    with DNG_TEST_SLURM=1; installs slurm-wlm and munge with apt-get when missing (root only). Install, start and
    the cluster's life are held under one machine-wide lock: whichever pytest-xdist worker gets the SLURM tests
    (xdist_group keeps them on one), a second worker never runs apt-get or a cluster beside the first."""
    import slurm_cluster

    if os.environ.get("CI") != "true" and os.environ.get("DNG_TEST_SLURM") != "1":
        pytest.skip("real-SLURM tests: set DNG_TEST_SLURM=1 (as root; installs slurm-wlm and munge with apt-get)")
    with slurm_cluster.machine_lock():
        if not slurm_cluster.installed():
            if os.geteuid() != 0:
                pytest.fail("the real-SLURM tests need slurm-wlm and munge: run as root (they are installed with apt-get)")
            slurm_cluster.install()
        cluster = slurm_cluster.Cluster().start()
        try:
            yield cluster
        finally:
            cluster.stop()
