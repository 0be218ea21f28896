"""`ccn submit`: send a sweep to a Ray cluster through the Ray Jobs API.

    job = submit("sweeps/demo.toml", "http://HEAD:8265", results="s3://bucket/prefix")
    print(job.job_id)                # then `ray job logs --follow --address ... JOB_ID`
    status = follow(job, sys.stdout) # optional: stream the job's logs until it ends

The job is `python -m orchestrator.cli run SPEC --address auto --results RESULTS ...`, run by the
cluster in a copy of this project (the Jobs API's `working_dir`: the project root, without the
virtual environment, results, caches, .git, wandb and build folders). The cluster must already
have the project's dependencies (its image or its setup commands install them); `pip` adds
packages to the job's runtime environment.

- The spec is validated here first (the same one-line errors as `ccn run`), before any contact
  with the cluster.
- A spec inside the project root travels at its own relative path (so paths in it that are
  relative to the spec stay right). A spec elsewhere, or one the upload leaves out (an excluded
  folder, or ignored by git: Ray's packaging honours .gitignore), is copied into the upload, to
  `.ccn-submit/<submission id>/<file name>`, for the time of the upload only (that folder must
  not be git-ignored, or the copy would be left out too).
- The results must be somewhere every node can write: a URI (s3://bucket/prefix, gs://...) or an
  absolute path on a shared file system (or, on a one-machine cluster, any absolute path).
- Environment: WANDB_MODE, WANDB_PROJECT and WANDB_ENTITY are forwarded when set. WANDB_API_KEY
  is never forwarded, printed or written: a cluster that logs online needs its own key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from orchestrator.schedule import unreachable
from orchestrator.spec import load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGING = ".ccn-submit"  # a spec from outside the project travels in this folder of the upload
# not uploaded (gitignore-style patterns relative to the project root; .gitignore is honoured too)
EXCLUDED_NAMES = (
    ".venv",
    ".git",
    "results",
    ".jax_cache",
    ".ccn",
    "wandb",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".gl",
    ".whl",
    "build",
    "dist",
)
EXCLUDES = [f"{name}/" for name in EXCLUDED_NAMES]
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


def jobs_address(address: str) -> str:
    """The Jobs API URL: http://HOST:PORT (a bare HOST:PORT gets http://)."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def check_results(results: str) -> None:
    """ValueError unless the results are a URI or an absolute path (the job runs elsewhere)."""
    if "://" in results or Path(results).is_absolute():
        return
    raise ValueError(
        f"--results {results!r}: the job runs on the cluster, in a temporary copy of this project; give a URI "
        "(s3://bucket/prefix) or an absolute path that every node can write (a shared file system)"
    )


def _excluded(relative: Path, root: Path) -> bool:
    """Whether the upload leaves out this file: an excluded folder on its path, or git ignores it
    (the Jobs API's packaging honours .gitignore files)."""
    if any(fnmatch.fnmatch(part, name) for part in relative.parts[:-1] for name in EXCLUDED_NAMES):
        return True
    try:
        ignored = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "--quiet", "--no-index", relative.as_posix()],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False  # no git here: only the excluded folders apply
    return ignored.returncode == 0


def _spec_in_upload(spec: Path, root: Path, submission_id: str) -> tuple[str, Path | None]:
    """The spec's path inside the uploaded folder, and the copy to remove after the upload (or None)."""
    resolved = spec.resolve()
    with contextlib.suppress(ValueError):
        relative = resolved.relative_to(root)
        if not _excluded(relative, root):
            return relative.as_posix(), None
    staged = root / STAGING / submission_id / resolved.name
    return staged.relative_to(root).as_posix(), staged


def build_entrypoint(
    spec_in_upload: str,
    results: str,
    *,
    wandb: str | None = None,
    batch_size: int | None = None,
    max_attempts: int | None = None,
    stage: str = "select",
) -> str:
    """The job's shell command: `ccn run` on the cluster, attached to it (`--address auto`)."""
    command = ["python", "-m", "orchestrator.cli", "run", spec_in_upload, "--address", "auto", "--results", results]
    if wandb:
        command += ["--wandb", wandb]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    if max_attempts:
        command += ["--max-attempts", str(max_attempts)]
    if stage != "select":
        command += ["--stage", stage]
    return shlex.join(command)


def build_runtime_env(root: Path = PROJECT_ROOT, pip: list[str] | None = None) -> dict:
    """The job's runtime environment: the project as working_dir, forwarded W&B settings, extra pip packages."""
    runtime_env: dict = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


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

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - Ray raises many kinds; one line for people
        raise SubmitError(f"the Ray Jobs API at {address!r} did not answer: {_one_line(error)}") from None


@contextlib.contextmanager
def _quiet_ray_logs():
    """Ray's INFO and WARNING lines while it packages the working_dir (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.dashboard.modules.dashboard_sdk")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def submit(
    spec: str | Path,
    address: str,
    results: str,
    *,
    wandb: str | None = None,
    batch_size: int | None = None,
    max_attempts: int | None = None,
    stage: str = "select",
    pip: list[str] | None = None,
    root: Path = PROJECT_ROOT,
) -> Submission:
    """Validate the spec, then submit it as a Ray job; returns at once (see `follow`).

    Raises SpecError (bad spec) or ValueError (bad --results) before contacting the cluster,
    and SubmitError when the cluster cannot be reached or refuses the job.
    """
    sweep = load_spec(spec)  # every spec problem, before any contact with the cluster
    check_results(results)
    submission_id = f"ccn-{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    spec_in_upload, staged = _spec_in_upload(Path(spec), root, submission_id)
    entrypoint = build_entrypoint(
        spec_in_upload, results, wandb=wandb, batch_size=batch_size, max_attempts=max_attempts, stage=stage
    )
    runtime_env = build_runtime_env(root, pip)
    client = connect(address)
    try:
        if staged is not None:
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spec, staged)
        with _quiet_ray_logs():  # packaging chatter: which ignored files were skipped, the upload's name
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={
                    "ccn_sweep": sweep.name,
                    "ccn_spec": spec_in_upload,
                    "ccn_results": results,
                    "ccn_stage": stage,
                },
            )
    except Exception as error:  # noqa: BLE001
        raise SubmitError(f"the Ray cluster at {jobs_address(address)!r} refused the job: {_one_line(error)}") from None
    finally:
        if staged is not None:
            shutil.rmtree(staged.parent, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / STAGING).rmdir()  # only when empty (another submission may be uploading)
    return Submission(job_id, jobs_address(address), sweep.name, str(spec), results, entrypoint, runtime_env)


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
