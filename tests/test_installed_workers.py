"""The build on Beam workers that import the *installed* package, not this source tree.

This is what ``--setup_file=./setup.py`` gives on Dataflow, Flink or Spark: the launcher builds an sdist
of the project (Beam's stager runs ``python -m build --sdist`` or ``python setup.py sdist``), stages it,
and every worker pip-installs it before it runs a bundle. Here:

1. the sdist is built by Beam's own stager code from a snapshot of the project (so the repo gets no
   ``build/`` or ``*.egg-info`` side effects), pip turns it into a wheel the way a worker's pip does, and
   the wheel is checked (package data present, nothing installed as bare ``pipelines``/``transforms``);
2. the wheel is installed into a fresh virtual environment (``workerenv``) that sees the heavy
   dependencies (torch, diffusers, beam...) of the main venv through a plain path line in a ``.pth`` file,
   which does *not* run the main venv's editable-install finder: ``import synpref`` fails there until
   the wheel is installed;
3. Beam's worker pool (``apache_beam.runners.worker.worker_pool_main``, what the Python SDK container
   runs in pool mode on Flink/Spark) is started from ``workerenv`` in a temp cwd, and a launcher process
   (this venv, the source tree, like ``synpref build``) runs the build on the portable runner with an
   embedded job server and ``--environment_type=EXTERNAL`` pointing at the pool;
4. a probe in ``workerenv`` (an audit hook loaded by a ``.pth`` line) logs every synpref ``.py``/``.pyc``
   file that any process of that environment opens, whether it lies in the installed copy or the source
   tree. The test asserts that SDK worker processes loaded the pipeline's modules, all from the
   installed copy, and none from the source tree; and that the shards are byte-identical to a
   DirectRunner build of the same config.
"""
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import synpref
from conftest import tiny_build_config
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from conftest import digests

REPO = Path(__file__).resolve().parents[1]
PORTABLE_BUILD_TIMEOUT_S = int(os.environ.get("SYNPREF_PORTABLE_TIMEOUT_S", "900"))
MAIN_SITE_PACKAGES = sysconfig.get_paths()["purelib"]
SNAPSHOT_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

# Loaded at start-up of every process of the worker env through a .pth ``import`` line. Logs "pid<TAB>path"
# for each .py/.pyc file opened under a watched directory (imports read files through io.open_code, which
# raises the "open" audit event). Installed only in the test's temporary worker env.
PROBE = '''\
import os, sys
_LOG = os.environ.get("SYNPREF_PROBE_LOG")
_WATCH = tuple(p for p in os.environ.get("SYNPREF_PROBE_WATCH", "").split(os.pathsep) if p)
if _LOG and _WATCH:
    def _synpref_probe(event, args):
        if event != "open" or not args or not isinstance(args[0], str):
            return
        path = args[0]
        if path.endswith((".py", ".pyc")) and path.startswith(_WATCH):
            with open(_LOG, "a") as f:
                f.write(f"{os.getpid()}\\t{path}\\n")
    sys.addaudithook(_synpref_probe)
'''


def _run(cmd, cwd, env=None, timeout=300, stdout_only=False):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if stdout_only and proc.returncode == 0:
        return proc.returncode, proc.stdout
    return proc.returncode, proc.stdout + proc.stderr


def _clean_env(**extra) -> dict:
    """The environment for the worker env's processes: nothing that points Python at the source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST", "BEAM_"))}
    env["PYTHONHASHSEED"] = os.environ.get("PYTHONHASHSEED", "0")
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _snapshot(dest: Path) -> Path:
    """What setup.py packages, copied out of the tree other people are editing: the top-level files and
    every top-level Python package folder (no .venv, out/, .git or tests). Beam's stager would build in
    the repo itself and leave build/ and *.egg-info there."""
    assert REPO not in dest.resolve().parents, f"snapshot {dest} must lie outside {REPO}"
    dest.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copy2(entry, dest / entry.name)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            shutil.copytree(entry, dest / entry.name, ignore=SNAPSHOT_IGNORE)
    return dest


def _build_wheel(tmp: Path) -> Path:
    """sdist exactly as Beam's --setup_file staging builds it, then a wheel from it as a worker's pip does."""
    from apache_beam.runners.portability.stager import Stager

    for tool in ("setuptools", "pip"):  # what an offline sdist/wheel build of setup.py needs
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"cannot build synpref's sdist/wheel offline: {tool} is not installed in {sys.prefix}")
    src = _snapshot(tmp / "src")
    sdist_dir = tmp / "sdist"
    sdist_dir.mkdir()
    cwd = os.getcwd()
    try:
        sdist = Path(Stager._build_setup_package(str(src / "setup.py"), str(sdist_dir)))
    finally:
        os.chdir(cwd)  # the stager chdirs into the setup.py folder
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"setup.py", "pipelines/build_preferences.py", "jobs/builtin_prompts.jsonl"} <= members, members

    wheel_dir = tmp / "wheel"
    rc, log = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                    "--no-cache-dir", "-w", str(wheel_dir), str(sdist)], cwd=tmp)
    assert rc == 0, log[-3000:]
    (wheel,) = wheel_dir.glob("synpref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "synpref/pipelines/build_preferences.py" in names
    assert "synpref/jobs/builtin_prompts.jsonl" in names
    assert {"synpref/jobs/demo_build.yaml", "synpref/jobs/demo_train.yaml"} <= names
    top_level = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"synpref"}, top_level  # no bare pipelines/, transforms/, schemas/, jobs/, training/
    return wheel


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    """A venv with synpref installed from its wheel and the main venv's dependencies on a plain path."""
    tmp = tmp_path_factory.mktemp("installed")
    wheel = _build_wheel(tmp)
    venv = tmp / "workerenv"
    rc, log = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert rc == 0, log
    python = venv / "bin" / "python"
    rc, site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                    stdout_only=True)
    assert rc == 0, site
    site = Path(site.strip())
    # A bare path line: the main venv's packages become importable, its .pth files (the editable
    # finder that maps synpref.* onto this source tree) do not run.
    (site / "_synpref_test_deps.pth").write_text(MAIN_SITE_PACKAGES + "\n")
    (site / "_synpref_probe.py").write_text(PROBE)
    (site / "_synpref_probe.pth").write_text("import _synpref_probe\n")
    probe = "import apache_beam, torch, diffusers, open_clip; import synpref"
    rc, log = _run([str(python), "-c", probe], cwd=tmp, env=_clean_env())
    assert rc != 0 and "No module named 'synpref'" in log, f"synpref importable before the install:\n{log[-2000:]}"

    # pip from the main venv, installing into the worker env (--python): the worker env needs no pip.
    rc, log = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--ignore-installed", "--no-cache-dir", str(wheel)], cwd=tmp)
    assert rc == 0, log[-3000:]
    rc, where = _run([str(python), "-c", "import synpref, synpref.pipelines.build_preferences as b; "
                                         "print(synpref.__file__); print(b.__file__)"], cwd=tmp, env=_clean_env(),
                     stdout_only=True)
    assert rc == 0, where[-3000:]
    installed = site / "synpref"
    files = [Path(line) for line in where.split()]
    assert all(installed in f.parents for f in files), where
    for bare in ("pipelines", "transforms", "schemas", "jobs", "training"):
        assert not (site / bare).exists(), bare
    yield {"python": python, "site": site, "installed": installed, "tmp": tmp}
    shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker pool exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"worker pool not listening on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the pool and the SDK workers it started: they share the process group we created for it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers outliving the pool, if any
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def worker_pool(worker_env, tmp_path):
    """Beam's worker pool service, run from the worker env in a temp cwd; yields its port and probe log."""
    cwd = tmp_path / "pool_cwd"
    cwd.mkdir()
    (tmp_path / "pool_tmp").mkdir()
    probe_log = tmp_path / "probe.log"
    log = tmp_path / "worker_pool.log"
    bin_dir = worker_env["python"].parent
    # Watch the installed copy and, to catch a leak, every source folder the launcher imports synpref from.
    sources = {os.path.dirname(m.__file__) for m in _synpref_source_modules()}
    watch = [str(worker_env["installed"]) + os.sep] + sorted(s + os.sep for s in sources)
    env = _clean_env(
        # worker_pool_main starts each SDK worker as a bare `python -c ...` found on PATH, not sys.executable.
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        SYNPREF_PROBE_LOG=str(probe_log), SYNPREF_PROBE_WATCH=os.pathsep.join(watch), TMPDIR=str(tmp_path / "pool_tmp"))
    assert shutil.which("python", path=env["PATH"]) == str(bin_dir / "python"), "workers would not run the worker env"
    port = _free_port()
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(worker_env["python"]), "-m", "apache_beam.runners.worker.worker_pool_main",
                                 f"--service_port={port}"], cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, proc, log)
        yield {"port": port, "pid": proc.pid, "probe_log": probe_log, "log": log, "watch": watch}
    finally:
        _stop(proc)
        shutil.rmtree(tmp_path, ignore_errors=True)  # both builds' outputs, logs (quoted in any failure)


LAUNCHER = """
import json, sys
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
job = json.load(open(sys.argv[1]))
build(build_config_from_dict(job["config"]), job["pipeline_args"])
"""


def _launch(config: dict, pipeline_args: list, tmp: Path, pool_log: Path) -> None:
    """Run the build from a launcher process (this venv, the source tree), as `synpref build` would.

    Not in this process: a portable job whose SDK worker never connects waits forever (the embedded job
    server runs it on a non-daemon thread, and its cancel() is a no-op), so only a killable process
    turns that into a failure instead of a hung test session.
    """
    job = tmp / "launcher_job.json"
    job.write_text(json.dumps({"config": config, "pipeline_args": pipeline_args}))
    (tmp / "launcher_tmp").mkdir()  # Beam's stager leaves temp dirs behind; keep them under tmp
    env = {**os.environ, "TMPDIR": str(tmp / "launcher_tmp")}
    try:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(job)], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=PORTABLE_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"portable build still running after {PORTABLE_BUILD_TIMEOUT_S}s (killed); "
                             f"worker pool log:\n{pool_log.read_text(errors='replace')[-3000:]}") from e
    assert proc.returncode == 0, (f"launcher failed:\n{proc.stderr[-4000:]}\n"
                                  f"worker pool log:\n{pool_log.read_text(errors='replace')[-3000:]}")


def _synpref_source_modules():
    """The launcher's (this process's) synpref packages: the source tree under an editable install."""
    names = ["synpref", "synpref.pipelines", "synpref.transforms", "synpref.transforms.rewards",
             "synpref.transforms.generators", "synpref.schemas", "synpref.jobs", "synpref.training"]
    return [importlib.import_module(n) for n in names]


def _module_of(path: str, root: Path) -> str:
    """'<root>/transforms/__pycache__/generation.cpython-311.pyc' -> 'transforms.generation'."""
    parts = [p for p in Path(path).relative_to(root).parts if p != "__pycache__"]
    parts[-1] = parts[-1].split(".")[0]
    return ".".join(parts)


@pytest.mark.slow
def test_build_on_workers_with_the_installed_package(worker_env, worker_pool, demo_models, tmp_path):
    installed = worker_env["installed"]
    assert installed not in Path(synpref.__file__).parents  # the launcher itself runs the source tree

    direct = tmp_path / "direct"
    build(build_config_from_dict(tiny_build_config(demo_models, direct)), None)
    portable = tmp_path / "installed_workers"
    args = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{worker_pool['port']}", "--sdk_worker_parallelism=1"]
    _launch(tiny_build_config(demo_models, portable), args, tmp_path, worker_pool["log"])
    assert digests(direct)  # not two empty outputs
    assert digests(portable) == digests(direct)

    pool_log = worker_pool["log"].read_text(errors="replace")
    assert worker_pool["probe_log"].exists(), f"no process of the worker env opened synpref:\n{pool_log[-3000:]}"
    opened = [line.split("\t", 1) for line in worker_pool["probe_log"].read_text().splitlines()]
    workers = {pid for pid, _ in opened if int(pid) != worker_pool["pid"]}
    assert workers, f"only the pool itself opened synpref files:\n{pool_log[-3000:]}"
    outside = sorted({path for _, path in opened if installed not in Path(path).parents})
    assert not outside, f"worker env processes read synpref from outside the installed copy: {outside[:10]}"
    loaded = {_module_of(path, installed) for pid, path in opened if pid in workers}
    # Every stage's DoFns are unpickled on the workers, so their modules come from the installed copy.
    expected = {"transforms.prompts", "transforms.generation", "transforms.scoring", "transforms.ranking",
                "transforms.filtering", "transforms.writing", "transforms.accounting"}
    assert expected <= loaded, sorted(loaded)
