"""Inference backends for the denoiser: eager PyTorch, ONNX Runtime or OpenVINO (``sampler.backend``).

A non-torch backend runs the UNet's exported ONNX graph. The graph is exported once per weights and versions
(``graph_key``: a hash of the weights, the UNet config, torch's and the exporter's versions), written atomically
into the cache (``cache_dir``) with a sidecar that holds its sha256, and checked on every load: a stale or corrupt
file is rebuilt, an export that fails falls back to torch with one logged line. Every backend returns float32 ε
in the same layout as the torch module (``Network`` in models.py calls it like the module).

``auto`` runs a short paired micro-benchmark once per machine (``machine_choice``; cached beside the graphs) and
uses the fastest backend in ``CLEARED`` — those whose paired table (docs/performance.md) showed results unchanged
— on a CPU in fp32 without ``torch.compile``; everywhere else torch. A backend other than torch is part of a
result's identity (``runs.TORCH_IDENTICAL_BACKENDS``): ONNX Runtime flipped one class in 7000 paired samples. ``DNG_AUTO_BACKEND`` overrides that choice
(the test suite sets ``torch``). Threads: every backend uses ``torch.get_num_threads()`` (``sampler.num_threads``,
``OMP_NUM_THREADS`` or SLURM's ``--cpus-per-task``, see ``pipeline.setup_torch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from dng_cli import UserError, one_line

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
GRAPH_BACKENDS = ("onnxruntime", "openvino")
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# Backends whose paired table (N = 1000 per method and dataset, same seeds; docs/performance.md) found every
# result unchanged: ``auto`` may choose only these.
CLEARED: frozenset[str] = frozenset({"onnxruntime"})
OPSET = 17
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights (wrapper, opset, names)
AUTO_MARGIN = 1.05  # auto takes a backend over torch only when the micro-benchmark measured it this much faster


def cache_dir() -> Path:
    """Where exported graphs and the machine's backend benchmark live: ``$DNG_CACHE/backends`` (the FID
    statistics' cache variable), else ``~/.cache/dng/backends``."""
    root = os.environ.get("DNG_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dng"
    return base / "backends"


def version(backend: str) -> str:
    if backend == "torch":
        return torch.__version__
    try:
        return metadata.version(PACKAGES[backend])
    except metadata.PackageNotFoundError:
        return ""


def available(backend: str) -> bool:
    return backend == "torch" or bool(version(backend))


def resolve(value, precision: str, device: str, compile: bool) -> str:
    """The backend a run uses: ``sampler.backend`` checked, with ``auto`` decided (``machine_choice`` on a CPU in
    fp32 without compile, else torch). An explicit graph backend needs a CPU, fp32, no compile and its package."""
    value = str(value)
    if value not in BACKENDS:
        raise UserError(f"sampler.backend={value!r} is invalid: allowed are {', '.join(BACKENDS)}")
    on_cpu = torch.device(str(device).split(":")[0] if str(device) != "auto" else "cpu").type == "cpu"
    if value == "auto":
        return machine_choice() if on_cpu and precision == "fp32" and not compile else "torch"
    if value == "torch":
        return value
    if not on_cpu:
        raise UserError(f"sampler.backend={value} runs on the CPU only: use sampler.backend=torch (or auto) with "
                        f"sampler.device={device}")
    if precision != "fp32":
        raise UserError(f"sampler.backend={value} runs fp32 only: use sampler.precision=fp32 (or backend=torch for "
                        f"{precision})")
    if compile:
        raise UserError(f"sampler.compile=true needs sampler.backend=torch (got {value})")
    if not available(value):
        raise UserError(f"sampler.backend={value} needs the {PACKAGES[value]} package: pip install -e \".[{value}]\"")
    return value


# ------------------------------------------------------------------------------------------- export
class _Denoiser(torch.nn.Module):
    """A diffusers UNet2DModel with positional inputs and one tensor output: what the ONNX exporter traces."""

    def __init__(self, unet, labelled: bool):
        super().__init__()
        self.unet, self.labelled = unet, labelled

    def forward(self, x, t, c=None):
        return self.unet(x, t, class_labels=c if self.labelled else None, return_dict=False)[0]


def labelled(unet) -> bool:
    return bool(getattr(unet.config, "num_class_embeds", None))


def weights_digest(unet) -> str:
    """sha256 of the module's tensors (names, shapes, bytes) and its config: the same for the same weights
    whatever file or folder they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def graph_key(unet) -> str:
    parts = {"weights": weights_digest(unet), "torch": torch.__version__, "opset": OPSET, "export": EXPORT_VERSION,
             "labelled": labelled(unet)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    from dng_cli.io import sha256_file

    return sha256_file(path)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(unet, path: Path) -> None:
    """The UNet as an ONNX graph at ``path`` (batch dimension dynamic; inputs x [B,C,H,W] float32, t [B] int64,
    c [B] int64 for a class-conditional model; output eps)."""
    import warnings

    net = _Denoiser(unet, labelled(unet)).eval()
    p = next(unet.parameters())
    size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    x = torch.zeros(2, int(unet.config.in_channels), size, size, dtype=torch.float32)
    t = torch.tensor([999, 1], dtype=torch.int64)
    inputs, names = (x, t), ["x", "t"]
    if net.labelled:
        inputs, names = (x, t, torch.zeros(2, dtype=torch.int64)), names + ["c"]
    axes = {n: {0: "batch"} for n in names + ["eps"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prior = p.device, p.dtype
        net.to("cpu", torch.float32)
        try:
            torch.onnx.export(net, inputs, str(path), input_names=names, output_names=["eps"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        finally:
            net.to(*prior)


def graph(unet) -> Path:
    """The cached ONNX graph of ``unet`` (exported and checked as the module docstring says)."""
    return cached_graph(f"unet-{graph_key(unet)}", lambda tmp: export(unet, tmp))


def cached_graph(name: str, export_to) -> Path:
    """``<cache>/<name>.onnx``, written by ``export_to(path)`` when missing, stale or corrupt (its sidecar
    ``<name>.json`` holds the graph's sha256, checked on every use)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path, meta = folder / f"{name}.onnx", folder / f"{name}.json"
    if path.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()).get("sha256") == _sha256(path):
                return path
            reason = "its checksum does not match"
        except (OSError, ValueError, AttributeError) as err:
            reason = f"its sidecar is unreadable ({type(err).__name__})"
        log.warning("rebuilding the cached ONNX graph %s: %s", path.name, reason)
    t0 = time.time()
    _atomic_write(path, export_to)
    info = {"name": name, "sha256": _sha256(path), "torch": torch.__version__, "opset": OPSET,
            "export_s": round(time.time() - t0, 2)}
    _atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    return path


def export_features(module, path: Path, example: torch.Tensor) -> None:
    """A one-input feature network (e.g. the TorchScript Inception) as an ONNX graph: input x, output f, batch
    dimension dynamic."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["f"],
                          dynamic_axes={"x": {0: "batch"}, "f": {0: "batch"}}, opset_version=OPSET, dynamo=False)


class Session:
    """A cached graph (``make_graph()`` -> path) opened on ONNX Runtime or OpenVINO with this process's thread
    count; ``run(feed) -> first output`` (numpy). A graph that passed its checksum but does not load is rebuilt once."""

    def __init__(self, make_graph, backend: str, threads: int | None = None):
        self.backend = backend
        self.threads = int(threads or torch.get_num_threads())
        self.path = make_graph()
        try:
            self._run = self._open(self.path)
        except Exception as err:
            log.warning("rebuilding the cached ONNX graph %s: %s could not load it (%s)", self.path.name, backend,
                        one_line(err))
            self.path.unlink(missing_ok=True)
            self.path = make_graph()
            self._run = self._open(self.path)

    def run(self, feed: dict) -> np.ndarray:
        return self._run(feed)

    def _open(self, path: Path):
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy cores between calls
            so.log_severity_level = 3
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.session_threads = lambda: session.get_session_options().intra_op_num_threads
            return lambda feed: session.run(None, feed)[0]
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": self.threads,
                                                         "INFERENCE_PRECISION_HINT": "f32"})  # never bf16 by default
        request = compiled.create_infer_request()
        self.session_threads = lambda: int(compiled.get_property("INFERENCE_NUM_THREADS"))
        return lambda feed: np.array(request.infer(feed)[compiled.output(0)], copy=True)



class GraphNetwork(Session):
    """The exported UNet on ONNX Runtime or OpenVINO, called like the torch module:
    ``forward(x, t, class_labels=…, return_dict=False) -> (eps,)`` with float32 torch tensors."""

    def __init__(self, unet, backend: str, threads: int | None = None):
        self.labelled = labelled(unet)
        super().__init__(lambda: graph(unet), backend, threads)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                 return_dict: bool = False):
        feed = {"x": np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()),
                "t": t.detach().to("cpu", torch.int64).reshape(-1).expand(x.shape[0]).contiguous().numpy()}
        if self.labelled:
            if class_labels is None:
                raise ValueError("a class-conditional graph needs class labels")
            feed["c"] = class_labels.detach().to("cpu", torch.int64).contiguous().numpy()
        return (torch.from_numpy(self._run(feed)).to(x.device),)


class FeatureGraph(Session):
    """A one-input feature network (``export_features``) on a graph backend, cached under ``name`` (which must
    name the weights, e.g. their sha256): ``graph(x) -> features`` with float32 torch tensors."""

    def __init__(self, module, name: str, example: torch.Tensor, backend: str, threads: int | None = None):
        key = hashlib.sha256(json.dumps({"name": name, "torch": torch.__version__, "opset": OPSET,
                                         "export": EXPORT_VERSION, "shape": list(example.shape[1:])}).encode())
        super().__init__(lambda: cached_graph(f"{name}-{key.hexdigest()[:16]}",
                                              lambda tmp: export_features(module, tmp, example)), backend, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run({"x": np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())}))


def features(module, name: str, example: torch.Tensor, backend: str):
    """``FeatureGraph`` of ``module`` on ``backend``, or None (torch: use the module) — also when the export or
    load fails, with one warning saying why."""
    if backend == "torch":
        return None
    try:
        return FeatureGraph(module, name, example, backend)
    except Exception as err:
        log.warning("the %s graph of %s is unavailable (%s: %s): running it on torch", backend, name,
                    type(err).__name__, one_line(err))
        return None


def network(unet, backend: str):
    """``unet`` itself for torch; else its ``GraphNetwork``, or — when the export or the load fails — the torch
    module with one warning saying why (the run records the backend it actually used)."""
    if backend == "torch":
        return unet, "torch"
    try:
        return GraphNetwork(unet, backend), backend
    except Exception as err:
        log.warning("sampler.backend=%s is unavailable for this model (%s: %s): running it on torch", backend,
                    type(err).__name__, one_line(err))
        return unet, "torch"


# ------------------------------------------------------------------------------------ auto: measure
def machine_key() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), **{b: version(b) for b in BACKENDS[1:]}}


def benchmark(backends=("torch", "onnxruntime", "openvino"), batch: int = 128, seconds: float = 0.6,
              rounds: int = 3, unet=None) -> dict:
    """Network evaluations per second of each available backend on the shipped MNIST UNet (or ``unet``), fp32,
    ``batch`` images per call, interleaved ``rounds`` of about ``seconds`` each; the median per backend."""
    from dng_cli.models import load_ddpm

    unet = unet if unet is not None else load_ddpm("mnist")
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    x = torch.randn(batch, int(unet.config.in_channels), int(size), int(size), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    c = torch.randint(0, int(unet.config.num_class_embeds or 1), (batch,), generator=g) if labelled(unet) else None
    nets = {}
    for b in backends:
        if not available(b):
            continue
        if b == "torch":  # as the sampler runs fp32 on a CPU: NHWC (sampler.channels_last=auto)
            xl = x.contiguous(memory_format=torch.channels_last)
            nets[b] = lambda: unet.to(memory_format=torch.channels_last)(xl, t, class_labels=c, return_dict=False)
        else:
            try:
                g_net = GraphNetwork(unet, b)
            except Exception as err:
                log.warning("benchmark: %s unavailable (%s)", b, one_line(err))
                continue
            nets[b] = lambda g_net=g_net: g_net(x, t, c)
    rates: dict[str, list[float]] = {b: [] for b in nets}
    with torch.inference_mode():
        for f in nets.values():
            f()  # warm-up
        for _ in range(rounds):
            for b, f in nets.items():
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds or n == 0:
                    f()
                    n += 1
                rates[b].append(n * batch / (time.perf_counter() - t0))
    return {b: float(np.median(r)) for b, r in rates.items()}


def machine_choice() -> str:
    """The backend ``auto`` uses on this machine's CPU in fp32: ``DNG_AUTO_BACKEND`` when set, else the fastest
    cleared one of a micro-benchmark run once per machine and cached (``benchmark.json`` in ``cache_dir``)."""
    forced = os.environ.get("DNG_AUTO_BACKEND")
    if forced:
        if forced not in BACKENDS[1:]:
            raise UserError(f"DNG_AUTO_BACKEND={forced!r} is invalid: allowed are {', '.join(BACKENDS[1:])}")
        return forced
    return machine_benchmark()["choice"]


def describe() -> str:
    """One line for ``dng --help``: what ``auto`` uses on this machine, from the cached benchmark (never measures)."""
    path = cache_dir() / "benchmark.json"
    try:
        cached = json.loads(path.read_text())
        rates = ", ".join(f"{b} {r:.0f}" for b, r in cached["evals_per_s"].items())
        return (f"sampler.backend=auto on this machine (CPU, fp32): {cached['choice']} — measured {cached['measured']}: "
                f"{rates} network evals/s ({path})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ("sampler.backend=auto on this machine (CPU, fp32): not measured yet — the first run that needs it "
                "measures torch against onnxruntime once (about 10 s) and caches the choice")


def machine_benchmark() -> dict:
    """This machine's cached micro-benchmark (run now when missing or for another machine/version)."""
    path, key = cache_dir() / "benchmark.json", machine_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("machine") == key and cached.get("choice") in BACKENDS[1:]:
            return cached
    except (OSError, ValueError):
        pass
    log.info("sampler.backend=auto: measuring the inference backends on this machine once (about 10 s; cached in %s)",
             path)
    rates = benchmark(tuple(b for b in ("torch", *sorted(CLEARED)) if available(b)))
    best = max((b for b in rates if b in CLEARED), key=rates.get, default="torch")
    choice = best if rates.get(best, 0) >= AUTO_MARGIN * rates.get("torch", 0) else "torch"
    result = {"machine": key, "evals_per_s": {b: round(r, 1) for b, r in rates.items()}, "choice": choice,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    log.info("sampler.backend=auto -> %s on this machine (%s)", choice,
             ", ".join(f"{b} {r:.0f}" for b, r in result["evals_per_s"].items()) + " network evals/s")
    return result
