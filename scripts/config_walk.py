"""Follow the composed config through one ``dng evaluate`` (or ``dng sample``) and count the module stops a reader
makes and how often they climb back to a module they came from (issue 45's measure of a one-way config).

A run of the shipped MNIST model (4 samples, 2 steps) is traced (``sys.setprofile``). The walk keeps the calls of dng_cli functions that
receive the config or something resolved from it — a ``DictConfig``/``ListConfig`` or a ``dng_cli.spec`` object
(RunSpec, ModelSpec, DatasetSpec, …) among their arguments — each (caller, callee) pair once, in the order they
first happen; reading a resolved spec (its properties and methods, e.g. ``run.seeds`` or its lazily computed
``run.identity``) is not a stop, and what such a method calls counts as called by the spec's reader. A reader starts in the command's module; each call into another module is a *stop*; when the next
call comes from a module the reader had left (the callee returned), they *climb* back there, which is a stop too.
``resolution_after_resolve_run`` lists the resolvers (spec's module functions, models'/data's name and format
resolvers) called once the first ``resolve_run`` has returned, including those handed a piece of the config (a
name, a source); what a spec's own methods call (its lazily computed identity hashes the weights) is not.

    python scripts/config_walk.py                 # evaluate: stops, climbs, the walk itself
    python scripts/config_walk.py --command sample
    python scripts/config_walk.py --json          # the numbers only, one JSON line
    python scripts/config_walk.py --count-spec-reads   # reading run.seeds, run.identity, … counts as a stop too
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TINY = ["n_samples=4", "sampler.steps=2", "sampler.batch_size=4", "sampler.progress=false",
        "sampler.backend=torch"]


RESOLVED = ("resolve_run returned",) * 4
# what turns a name or setting of the config into something resolved (wherever it lives)
RESOLVERS = {(m, f) for f in ("resolve", "unet_weights_file", "null_label_index", "classifier_source",
                              "classifier_weights_hash", "native_bf16", "resolve_precision", "dataset_format",
                              "split_source", "build_guidance", "model_spec", "dataset_spec", "resolve_run")
             for m in ("dng_cli.spec", "dng_cli.models", "dng_cli.data")}


def carries_config(frame) -> bool:
    from omegaconf import DictConfig, ListConfig

    code = frame.f_code
    for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        value = frame.f_locals.get(name)
        if isinstance(value, (DictConfig, ListConfig)) or type(value).__module__ == "dng_cli.spec":
            return True
    return False


COUNT_SPEC_READS = False  # --count-spec-reads: every property/method of a spec is a stop too


def reads_spec(frame) -> bool:
    """A method of a resolved spec (``run.seeds``, ``run.identity``, …): reading the spec, not a stop."""
    if COUNT_SPEC_READS:
        return False
    code = frame.f_code
    return (frame.f_globals.get("__name__") == "dng_cli.spec" and code.co_argcount > 0
            and type(frame.f_locals.get(code.co_varnames[0])).__module__ == "dng_cli.spec")


def module_of(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith("dng_cli") else None


def trace(command: str) -> list[tuple[str, str, str, str]]:
    """(caller module, caller function, callee module, callee function) of every first config-carrying call."""
    from dng_cli.validate import compose

    import importlib

    cmd = importlib.import_module(f"dng_cli.commands.{command}")
    cfg = compose(command, TINY)
    seen, calls = set(), []

    def profile(frame, event, arg):
        if event == "return" and frame.f_code.co_qualname == "resolve_run" and module_of(frame) == "dng_cli.spec":
            calls.append(RESOLVED)
            return
        if event != "call":
            return
        callee = module_of(frame)
        if callee is None or reads_spec(frame):
            return
        parent = frame.f_back
        while parent is not None and module_of(parent) is None:
            parent = parent.f_back
        lazy = parent is not None and reads_spec(parent)  # called by a spec's own method (its lazy identity)
        while parent is not None and (module_of(parent) is None or reads_spec(parent)):
            parent = parent.f_back
        if parent is None:
            return
        own = carries_config(frame)
        if not (own or carries_config(parent)):
            return
        key = (module_of(parent), parent.f_code.co_qualname, callee, frame.f_code.co_qualname)
        if key not in seen:
            seen.add(key)
            calls.append(key if own else ("lazy" if lazy else "handed",) + key)

    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(profile)
        try:
            cmd.run(cfg, Path(tmp) / "run")
        finally:
            sys.setprofile(None)
    return calls


def walk(calls, start: str) -> dict:
    position, stops, climbs, path = start, 1, 0, [start]
    resolved, after = False, []
    for call in calls:
        if call == RESOLVED:
            resolved = True
            continue
        if call[0] in ("handed", "lazy"):  # a piece of the config handed on: only to see resolution after resolve_run
            kind, caller, caller_fn, callee, callee_fn = call
            if kind == "lazy":
                continue
            if resolved and (callee, callee_fn) in RESOLVERS:
                after.append(callee_fn)
            continue
        caller, caller_fn, callee, callee_fn = call
        if position != caller:
            climbs += 1
            stops += 1
            position = caller
            path.append(f"^{caller}")
        if callee != position:
            stops += 1
            position = callee
            path.append(f"{callee}.{callee_fn}")
        if resolved and (callee == "dng_cli.spec" and "." not in callee_fn or (callee, callee_fn) in RESOLVERS):
            after.append(callee_fn)  # a resolver (a spec's own methods, e.g. its lazy identity, are not)
    return {"stops": stops, "climbs": climbs, "calls": len([c for c in calls if c != RESOLVED and c[0] not in ("handed", "lazy")]),
            "path": path,
            "resolution_after_resolve_run": after}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", default="evaluate", choices=("evaluate", "sample"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count-spec-reads", action="store_true", help="count reading a spec's fields as stops")
    args = parser.parse_args(argv)
    global COUNT_SPEC_READS
    COUNT_SPEC_READS = args.count_spec_reads
    result = walk(trace(args.command), f"dng_cli.commands.{args.command}")
    modules = sorted({p.lstrip("^").rsplit(".", 1)[0] if not p.startswith("^") else p[1:] for p in result["path"]})
    summary = {"command": args.command, "count_spec_reads": args.count_spec_reads, "stops": result["stops"], "climbs": result["climbs"],
               "calls": result["calls"], "modules": len(modules),
               "resolution_after_resolve_run": sorted(set(result["resolution_after_resolve_run"]))}
    if not args.json:
        for step in result["path"]:
            print(("  climb back to " + step[1:]) if step.startswith("^") else step)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
