"""`ccn submit`: send a sweep to a Ray cluster through the Ray Jobs API.

    job = submit("sweeps/demo.toml", "http://HEAD:8265", results="s3://bucket/prefix")
    print(job.job_id)                # then `ray job logs --follow --address ... JOB_ID`
    status = follow(job, sys.stdout) # optional: stream the job's logs until it ends
    upload = dry_run("sweeps/demo.toml", "s3://bucket/prefix")   # what would be uploaded, nothing sent

The job is `python -m orchestrator.cli run SPEC --address auto --results RESULTS ...`. Only what
it needs is uploaded, from a private staging folder that holds copies of exactly these files:

- the project's packages (learners, environments, orchestrator, analysis, cluster) as Ray
  `py_modules`: their `.py` files only, wherever the packages are installed (a checkout or
  site-packages); hidden files and folders, symlinks, caches and anything named like a secret
  (`.env*`, `*.pem`, `*.key`, `credentials*`, `.aws`, ...) are never copied;
- the spec, as the job's `working_dir` (and its only file): at its path relative to the project
  root when it lives inside it (`sweeps/demo.toml`), else under its file name.

`ccn submit --dry-run` lists every file of that upload and submits nothing. The cluster must
already have the project's dependencies (its image or its setup commands install them); `pip`
adds packages to the job's runtime environment. Data the spec names (an Atari `policy_dir`) is
not uploaded: give a path that exists on the cluster's nodes.

- The spec is validated here first (the same one-line errors as `ccn run`), before any contact
  with the cluster.
- The results must be somewhere every node can write: a URI (s3://bucket/prefix, gs://...) or an
  absolute path on a shared file system (or, on a one-machine cluster, any absolute path).
- Token authentication: the Jobs API of a cluster with Ray's token auth needs the token. It is
  taken from the local cluster recorded for that dashboard (`ccn cluster up`), else from Ray's own
  settings ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token),
  sent as a header only, and never printed, uploaded or written.
- Environment: WANDB_MODE, WANDB_PROJECT and WANDB_ENTITY are forwarded when set. WANDB_API_KEY
  is never forwarded, printed or written: a cluster that logs online needs its own key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import logging
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from orchestrator.schedule import unreachable
from orchestrator.spec import external_packages, load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("learners", "environments", "orchestrator", "analysis", "cluster")  # uploaded as py_modules
UPLOADED_SUFFIXES = (".py",)  # the only files of the packages that a job needs
# never uploaded, wherever they are (an allowlist of .py files already leaves most out; these names
# are refused even as .py files or folders)
SECRET_NAMES = (
    ".env",
    ".env.*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.crt",
    "credentials*",
    "*credential*",
    "*secret*",
    ".aws",
    ".ssh",
    ".gnupg",
    ".netrc",
    ".pypirc",
    ".git-credentials",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
)
FORWARDED_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")  # never WANDB_API_KEY
SECRET_ENV = "WANDB_API_KEY"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_SECONDS = 1.0


class SubmitError(RuntimeError):
    """The cluster's Jobs API cannot be reached or refused the job (a message for people)."""


@dataclass
class Submission:
    """A submitted sweep job: its id, where it runs, and what it runs."""

    job_id: str
    address: str  # the Jobs API (dashboard) URL
    sweep: str
    spec: str  # the spec's path as given here
    results: str
    entrypoint: str
    runtime_env: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # what was uploaded ("py_modules: learners/ccn.py", ...)
    left_out: list[str] = field(default_factory=list)  # files of the packages named like secrets: not uploaded

    def instructions(self) -> list[str]:
        """How to follow, inspect and stop the job (lines for people)."""
        where = f"--address {self.address}"
        return [
            f"follow its logs:  ray job logs --follow {where} {self.job_id}",
            f"its status:       ray job status {where} {self.job_id}",
            f"stop it:          ray job stop {where} {self.job_id}",
            f"dashboard:        {self.address}",
            f"results:          ccn status {shlex.quote(self.spec)} --results {shlex.quote(self.results)}",
        ]


@dataclass
class Upload:
    """A staged upload: a private folder holding copies of exactly the files the job gets."""

    folder: Path  # the staging folder (removed when the `stage_upload` context ends)
    working_dir: Path  # folder/job: the spec, at `spec`
    py_modules: list[Path]  # folder/modules/<package>
    spec: str  # the spec's path inside the working_dir (the job's argument)
    left_out: list[str] = field(default_factory=list)  # files of the packages not uploaded (secret-like names)

    def files(self) -> list[str]:
        """Every uploaded file: `working_dir: sweeps/demo.toml`, `py_modules: learners/ccn.py`, ..."""
        listed = [f"working_dir: {path}" for path in _walk(self.working_dir)]
        for module in self.py_modules:
            listed += [f"py_modules: {module.name}/{path}" for path in _walk(module)]
        return listed


def _walk(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def jobs_address(address: str) -> str:
    """The Jobs API URL: http://HOST:PORT (a bare HOST:PORT gets http://)."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def check_results(results: str) -> None:
    """ValueError unless the results are a URI or an absolute path (the job runs elsewhere)."""
    if "://" in results or Path(results).is_absolute():
        return
    raise ValueError(
        f"--results {results!r}: the job runs on the cluster, in a temporary folder of its own; give a URI "
        "(s3://bucket/prefix) or an absolute path that every node can write (a shared file system)"
    )


def package_folders() -> dict[str, Path]:
    """Where this interpreter imports each uploaded package from (a checkout or site-packages)."""
    folders = {}
    for name in PACKAGES:
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise SubmitError(f"the package {name!r} cannot be found: is ccn-sweeps installed?")
        folders[name] = Path(next(iter(found.submodule_search_locations))).resolve()
    return folders


def secret_like(name: str) -> bool:
    """Whether a file or folder name looks like it holds credentials (never uploaded)."""
    lowered = name.lower()
    return any(fnmatch.fnmatch(lowered, pattern) for pattern in SECRET_NAMES)


def _copy_package(source: Path, target: Path, left_out: list[str]) -> None:
    """Copy the package's .py files (regular files only, never a secret-like or hidden name)."""
    for folder, subfolders, files in os.walk(source, followlinks=False):
        here = Path(folder)
        kept = []
        for name in sorted(subfolders):
            if name.startswith(".") or name == "__pycache__" or secret_like(name) or (here / name).is_symlink():
                if secret_like(name):
                    left_out.append(str(here / name))
                continue
            kept.append(name)
        subfolders[:] = kept
        for name in sorted(files):
            path = here / name
            if secret_like(name):
                left_out.append(str(path))
                continue
            if name.startswith(".") or not name.endswith(UPLOADED_SUFFIXES):
                continue
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):  # a symlink (perhaps to ~/.aws/credentials) is never followed
                continue
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination, follow_symlinks=False)


def spec_in_upload(spec: Path, root: Path = PROJECT_ROOT) -> str:
    """The spec's path in the job's working_dir: relative to the project root when inside it, else its name."""
    resolved = spec.resolve()
    with contextlib.suppress(ValueError):
        return resolved.relative_to(root.resolve()).as_posix()
    return resolved.name


def job_packages(sweep) -> dict[str, Path]:
    """The packages a job imports: the project's and those of the learners and tasks the spec names
    by module path (`kind = "my_package.my_learner"`), each from where this interpreter imports it."""
    return {**package_folders(), **external_packages(sweep)}


@contextlib.contextmanager
def stage_upload(
    spec: str | Path, root: Path = PROJECT_ROOT, packages: dict[str, Path] | None = None
) -> Iterator[Upload]:
    """Stage exactly what the job needs in a private temporary folder; removed afterwards."""
    packages = packages if packages is not None else package_folders()
    folder = Path(tempfile.mkdtemp(prefix="ccn-submit-"))  # mode 0700
    try:
        upload = Upload(folder, folder / "job", [], spec_in_upload(Path(spec), root))
        staged_spec = upload.working_dir / upload.spec
        staged_spec.parent.mkdir(parents=True)
        shutil.copyfile(spec, staged_spec)
        for name, source in packages.items():
            target = folder / "modules" / name
            target.mkdir(parents=True)
            _copy_package(source, target, upload.left_out)
            upload.py_modules.append(target)
        yield upload
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# the `ccn run` options a job's driver takes from `ccn submit` (flag: --max-attempts for max_attempts)
DRIVER_OPTIONS = ("wandb", "batch_size", "max_attempts", "max_actors", "actors_per_gpu", "takeover")


def build_entrypoint(spec_in_upload: str, results: str, *, stage: str = "select", **options) -> str:
    """The job's shell command: `ccn run` on the cluster, attached to it (`--address auto`).

    options: DRIVER_OPTIONS, passed on as `ccn run` flags (None/False: left out; True: a bare flag).
    """
    unknown = set(options) - set(DRIVER_OPTIONS)
    if unknown:
        raise TypeError(f"unknown driver options: {', '.join(sorted(unknown))}")
    command = ["python", "-m", "orchestrator.cli", "run", spec_in_upload, "--address", "auto", "--results", results]
    if stage != "select":
        command += ["--stage", stage]
    for name in DRIVER_OPTIONS:
        value = options.get(name)
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value:
            command += [flag, str(value)]
    return shlex.join(command)


def build_runtime_env(upload: Upload, pip: list[str] | None = None) -> dict:
    """The job's runtime environment: the staged spec as working_dir, the packages as py_modules,
    forwarded W&B settings, extra pip packages."""
    runtime_env: dict = {
        "working_dir": str(upload.working_dir),
        "py_modules": [str(module) for module in upload.py_modules],
    }
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def _token(address: str) -> str | None:
    """The token for this Jobs API: the recorded local cluster's, else $RAY_AUTH_TOKEN(_PATH); None: Ray's own."""
    from cluster import local

    recorded = local.recorded_for(address)
    path = recorded.token_file if recorded is not None and recorded.token_file else None
    if path is None and os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = path or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path:
        return None  # Ray adds ~/.ray/auth_token itself when RAY_AUTH_MODE=token
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError as error:
        raise SubmitError(f"cannot read the Ray auth token file {path}: {error.strerror}") from None


def connect(address: str, timeout: float = 5.0):
    """A JobSubmissionClient for the cluster at `address`; SubmitError (one line) when unreachable."""
    address = jobs_address(address)
    parsed = urlparse(address)
    try:
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        host, port = None, None
    if parsed.scheme not in ("http", "https") or not host:
        raise SubmitError(f"the Jobs API address {address!r} must look like http://HOST:PORT (the dashboard's)")
    problem = unreachable(host, port, timeout)
    if problem:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address!r}: {problem}. Is the cluster up with its "
            "dashboard on, and is this the dashboard's address (http://HEAD:8265, not the GCS port)?"
        )
    from ray.job_submission import JobSubmissionClient

    token = _token(address)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # noqa: BLE001 - Ray raises many kinds; one line for people
        raise SubmitError(f"the Ray Jobs API at {address!r} did not answer: {_one_line(error, token)}") from None


@contextlib.contextmanager
def _quiet_ray_logs():
    """Ray's INFO and WARNING lines while it packages the upload (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.dashboard.modules.dashboard_sdk")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _one_line(error: BaseException, token: str | None = None) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if token:
        text = text.replace(token, "<token>")
    hint = ""
    if re.search(r"\b40[13]\b|unauthori[sz]ed|forbidden|authenticat", text, re.IGNORECASE):
        text = text if len(text) <= 120 else text[:117] + "..."
        hint = (
            " (the cluster wants Ray's auth token: set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, or "
            "RAY_AUTH_MODE=token with ~/.ray/auth_token; docs/cluster.md)"
        )
    return (text if len(text) <= 300 else text[:297] + "...") + hint


@dataclass
class DryRun:
    """What `submit` would send: the job's entrypoint, runtime environment and every uploaded file."""

    sweep: str
    entrypoint: str
    runtime_env: dict
    files: list[str]
    left_out: list[str]

    def describe(self) -> list[str]:
        env_vars = self.runtime_env.get("env_vars", {})
        lines = [
            f"dry run: sweep {self.sweep!r} would be submitted as (nothing was sent)",
            f"  entrypoint: {self.entrypoint}",
            f"  forwarded environment: {', '.join(sorted(env_vars)) or '(none)'}",
        ]
        if self.runtime_env.get("pip"):
            lines.append(f"  pip: {' '.join(self.runtime_env['pip'])}")
        lines.append(f"  upload: {len(self.files)} files")
        lines += [f"    {name}" for name in self.files]
        if self.left_out:
            lines.append(f"  left out (names that look like secrets): {len(self.left_out)}")
            lines += [f"    {name}" for name in self.left_out]
        return lines


def dry_run(
    spec: str | Path,
    results: str,
    *,
    stage: str = "select",
    pip: list[str] | None = None,
    root: Path = PROJECT_ROOT,
    **options,
) -> DryRun:
    """Validate the spec and stage the upload; returns what `submit` would send. Contacts nothing."""
    sweep = load_spec(spec)
    check_results(results)
    with stage_upload(spec, root, job_packages(sweep)) as upload:
        entrypoint = build_entrypoint(upload.spec, results, stage=stage, **options)
        return DryRun(sweep.name, entrypoint, build_runtime_env(upload, pip), upload.files(), list(upload.left_out))


def submit(
    spec: str | Path,
    address: str,
    results: str,
    *,
    stage: str = "select",
    pip: list[str] | None = None,
    root: Path = PROJECT_ROOT,
    **options,
) -> Submission:
    """Validate the spec, then submit it as a Ray job; returns at once (see `follow`).

    Raises SpecError (bad spec) or ValueError (bad --results) before contacting the cluster,
    and SubmitError when the cluster cannot be reached or refuses the job.
    """
    sweep = load_spec(spec)  # every spec problem, before any contact with the cluster
    check_results(results)
    submission_id = f"ccn-{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    client = connect(address)
    with stage_upload(spec, root, job_packages(sweep)) as upload:
        entrypoint = build_entrypoint(upload.spec, results, stage=stage, **options)
        runtime_env = build_runtime_env(upload, pip)
        files, left_out = upload.files(), list(upload.left_out)
        try:
            with _quiet_ray_logs():  # packaging chatter: the upload's name and size
                job_id = client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                    metadata={
                        "ccn_sweep": sweep.name,
                        "ccn_spec": upload.spec,
                        "ccn_results": results,
                        "ccn_stage": stage,
                    },
                )
        except Exception as error:  # noqa: BLE001
            message = _one_line(error, _token(address))
            raise SubmitError(f"the Ray cluster at {jobs_address(address)!r} refused the job: {message}") from None
    return Submission(
        job_id, jobs_address(address), sweep.name, str(spec), results, entrypoint, runtime_env, files, left_out
    )


def follow(job: Submission, stream: TextIO | None = None, poll: float = POLL_SECONDS) -> str:
    """Print the job's logs as they grow until it ends; returns its final status (SUCCEEDED, ...)."""
    stream = stream or sys.stdout
    client = connect(job.address)
    printed = 0
    while True:
        status = str(client.get_job_status(job.job_id).value)
        logs = client.get_job_logs(job.job_id)
        if len(logs) > printed:
            stream.write(logs[printed:])
            stream.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)
