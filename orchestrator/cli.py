"""`ccn`: the command line over orchestrator.api.

    ccn run SPEC [--results DIR_OR_URI] [--address ADDR] [--batch-size B] [--workers N] [--wandb MODE]
            [--max-actors A] [--actors-per-gpu K]
    ccn status SPEC [--results DIR_OR_URI]
    ccn compare SPEC [--results DIR_OR_URI] [--criterion final_error|auc]   # the analysis selection rule
    ccn plan SPEC [--results DIR_OR_URI] [--batch-size B] [--workers N]
    ccn run SPEC --stage evaluate            # each learner's winner on fresh seeds (docs/analysis.md)
    ccn report RESULTS [--spec SPEC] [--sweep NAME] --out DIR [--criterion final_error|auc] [--along PARAM]
    ccn cluster up --workers N [--cpus-per-node C] [--no-auth]   # a local multi-node Ray (docs/cluster.md)
    ccn cluster down
    ccn submit SPEC --address http://HEAD:8265 --results URI [--wait]   # a Ray job (docs/cluster.md)
    ccn submit SPEC --results URI --dry-run   # list every file the job's upload would hold
    ccn wandb-sync SPEC [--results DIR_OR_URI] --wandb offline|online   # log batches W&B has not had

Exit codes: 0 done; 1 some runs failed, the sweep stopped, or the cluster is unreachable (or
a followed job did not succeed); 2 the spec (or a command-line value) is invalid, before any
compute; 130 interrupted (Ctrl-C or SIGTERM: rerun the same command to finish what is missing;
`ccn submit --wait` stops following and the job goes on).
"""

from __future__ import annotations

import argparse
import sys
import threading

from orchestrator import api, interrupts
from orchestrator.spec import EVALUATION_SUFFIX, SpecError, is_safe_path_component

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_execution_options(parser: argparse.ArgumentParser, wandb_help: str) -> None:
    """The driver's options, shared by `ccn run` and `ccn submit` (which forwards them to the job's `ccn run`)."""
    parser.add_argument("--batch-size", type=_positive_int, metavar="B", help="runs per compiled batch (default: auto)")
    parser.add_argument("--max-attempts", type=_positive_int, metavar="K", help="tries per batch (default: spec's, 3)")
    parser.add_argument("--wandb", choices=api.WANDB_MODES, default=None, help=wandb_help)
    parser.add_argument(
        "--max-actors",
        type=_positive_int,
        metavar="A",
        help="most actors the sweep holds at once (default: on a cluster one per queued batch, which an "
        "autoscaler grows the cluster for; locally one per CPU)",
    )
    parser.add_argument(
        "--actors-per-gpu",
        type=_positive_int,
        metavar="K",
        help="GPU actors sharing each GPU, each with 1/K of it and 0.9/K of its memory (default: 2; docs/cluster.md)",
    )
    parser.add_argument(
        "--takeover",
        action="store_true",
        help="take over the sweep's lease from a dead driver (allowed once its heartbeat is older than "
        "$CCN_LEASE_EXPIRY seconds, default 60)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccn", description="Run compute-matched sweeps of online learners on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("spec", metavar="SPEC", help="the sweep spec (TOML), e.g. sweeps/demo.toml")
        sub.add_argument(
            "--results",
            default=api.DEFAULT_RESULTS,
            metavar="DIR_OR_URI",
            help="results root: a folder or a pyarrow filesystem URI (default: ./results)",
        )
        return sub

    run = command("run", "run every run of SPEC that the results do not hold yet")
    run.add_argument("--address", metavar="ADDR", help="attach to this Ray cluster (default: start a local one)")
    run.add_argument("--workers", type=_positive_int, metavar="N", help="local CPU workers (default: all cores)")
    _add_execution_options(run, "W&B tracking (default: $WANDB_MODE if set, else disabled; the same as api.run_sweep)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument(
        "--stage",
        choices=api.STAGES,
        default="select",
        help="select: the spec's grid (default); evaluate: each learner's winner on fresh seeds",
    )

    command("status", "report done / missing / diverged / failed runs of SPEC from the results")

    comparison = command(
        "compare", "print each learner's best setting on each task (the analysis selection rule, SPEC's runs only)"
    )
    comparison.add_argument(
        "--criterion", choices=("final_error", "auc"), default="final_error", help="selection rule (final_error)"
    )

    plan = command("plan", "validate SPEC and show what `ccn run` would do, without running anything")
    plan.add_argument("--batch-size", type=_positive_int, metavar="B")
    plan.add_argument("--workers", type=_positive_int, default=1, metavar="N")
    _add_report(commands)
    _add_cluster(commands)
    _add_submit(commands)
    _add_wandb_sync(commands)
    return parser


def _add_wandb_sync(commands) -> None:
    """`ccn wandb-sync`: log to W&B the finished batches it has not had (orchestrator.tracking.sync)."""
    text = "log to W&B every finished batch of SPEC that W&B has not had yet (idempotent)"
    sync = commands.add_parser("wandb-sync", help=text, description=text)
    sync.add_argument("spec", metavar="SPEC", help="the sweep spec (TOML)")
    sync.add_argument(
        "--results", default=api.DEFAULT_RESULTS, metavar="DIR_OR_URI", help="results root (default: ./results)"
    )
    sync.add_argument("--wandb", choices=("offline", "online"), default=None, help="W&B mode (default: $WANDB_MODE)")
    sync.add_argument("--stage", choices=api.STAGES, default="select", help="select (default) or evaluate")


def _wandb_sync(arguments) -> int:
    from orchestrator import tracking

    try:
        report = tracking.sync(arguments.spec, arguments.results, arguments.wandb, stage=arguments.stage)
    except ValueError as error:  # W&B disabled, or the evaluation stage has no selection yet
        if isinstance(error, SpecError):
            raise
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(report.describe())
    return EXIT_FAILED if report.failed else EXIT_OK


def _add_submit(commands) -> None:
    """`ccn submit`: a thin layer over cluster.submit (the Ray Jobs API; docs/cluster.md)."""
    text = "run SPEC on a Ray cluster as a job (the Ray Jobs API); returns once it is submitted"
    submit = commands.add_parser("submit", help=text, description=text)
    submit.add_argument("spec", metavar="SPEC", help="the sweep spec (TOML), validated here before submitting")
    submit.add_argument(
        "--address", metavar="URL", help="the cluster's Jobs API: its dashboard, http://HEAD:8265 (required to submit)"
    )
    submit.add_argument(
        "--results",
        required=True,
        metavar="URI_OR_ABS_PATH",
        help="results root as the cluster sees it: s3://bucket/prefix or an absolute shared path",
    )
    _add_execution_options(
        submit, "W&B mode on the cluster (default: the cluster's; $WANDB_MODE here is forwarded, $WANDB_API_KEY never)"
    )
    submit.add_argument("--stage", choices=api.STAGES, default="select", help="select (default) or evaluate")
    submit.add_argument(
        "--pip",
        "--runtime-env-pip",
        dest="pip",
        action="append",
        metavar="PACKAGE",
        help="a pip requirement to add to the job's environment (repeatable; default: none, the cluster has the deps)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the job's logs; exit 0 if it succeeds, else 1")
    submit.add_argument(
        "--dry-run", action="store_true", help="list every file that would be uploaded, and the job; submit nothing"
    )


def _submit(arguments) -> int:
    from cluster import submit

    driver = {name: getattr(arguments, name) for name in submit.DRIVER_OPTIONS}  # forwarded to the job's ccn run
    if arguments.dry_run:
        try:
            planned = submit.dry_run(
                arguments.spec, arguments.results, stage=arguments.stage, pip=arguments.pip, **driver
            )
        except ValueError as error:  # a bad --results (SpecError is handled by main)
            if isinstance(error, SpecError):
                raise
            print(f"ccn: {error}", file=sys.stderr)
            return EXIT_USAGE
        print("\n".join(planned.describe()))
        return EXIT_OK
    if not arguments.address:
        print("ccn: submit: --address URL is required (the cluster's dashboard; or --dry-run)", file=sys.stderr)
        return EXIT_USAGE
    try:
        job = submit.submit(
            arguments.spec,
            arguments.address,
            arguments.results,
            stage=arguments.stage,
            pip=arguments.pip,
            **driver,
        )
    except submit.SubmitError as error:
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as error:  # a bad --results (SpecError is handled by main)
        if isinstance(error, SpecError):
            raise
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted sweep {job.sweep!r} as Ray job {job.job_id} ({len(job.files)} files uploaded)")
    for path in job.left_out:
        print(f"ccn: not uploaded (named like a secret): {path}", file=sys.stderr)
    for line in job.instructions():
        print(f"  {line}")
    if not arguments.wait:
        return EXIT_OK
    sys.stdout.flush()
    try:
        status = submit.follow(job)
    except KeyboardInterrupt:
        print(
            f"\nccn: stopped following; the job goes on (ray job stop --address {job.address} {job.job_id})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the cluster went away while we followed
        print(f"ccn: lost the job {job.job_id}: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {job.job_id}: {status}")
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def _add_cluster(commands) -> None:
    """`ccn cluster up|down|status`: a thin layer over cluster.local (docs/cluster.md)."""
    cluster = commands.add_parser("cluster", help="start or stop a local multi-node Ray cluster (127.0.0.1)")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start a head and N worker nodes; prints the address")
    up.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="worker nodes (default: 2)")
    up.add_argument("--cpus-per-node", type=_positive_int, default=1, metavar="C", help="CPUs per worker (default 1)")
    up.add_argument(
        "--no-auth",
        dest="auth",
        action="store_false",
        help="turn Ray's token authentication off (default: on; anyone on this machine could then attach)",
    )
    for action in (
        up,
        actions.add_parser("down", help="stop exactly what `up` started"),
        actions.add_parser("status", help="print the recorded cluster"),
    ):
        action.add_argument(
            "--state", metavar="FILE", help="state file (default: $CCN_CLUSTER_STATE or .ccn/cluster.json)"
        )


def _cluster(arguments) -> int:
    from cluster import local

    try:
        if arguments.action == "up":
            started = local.up(arguments.workers, arguments.cpus_per_node, state=arguments.state, auth=arguments.auth)
            print(f"local Ray cluster up: 1 head + {started.workers} workers x {started.cpus_per_node} CPUs")
            print(f"address: {started.address}")
            print(f"dashboard: {started.dashboard}")
            if started.token_file:
                print(f"token auth: on; token in {started.token_file} (ccn finds it; other clients: ", end="")
                print(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={started.token_file})")
            else:
                print("token auth: off (--no-auth): anyone on this machine can attach and run code")
            print(f"run a sweep on it:  ccn run SPEC --address {started.address}")
            print(f"or submit it:       ccn submit SPEC --address {started.dashboard} --results ABSOLUTE_DIR")
            print(f"stop it:            ccn cluster down   (state: {local.state_path(arguments.state)})")
        elif arguments.action == "down":
            stopped = local.down(arguments.state)
            print(f"local Ray cluster at {stopped.address} stopped ({len(stopped.nodes)} nodes)")
        else:
            recorded = local.status(arguments.state)
            if recorded:
                print(f"address: {recorded.address}")
                print(f"dashboard: {recorded.dashboard or '(off)'}")
            else:
                print("no local cluster is recorded")
    except (local.ClusterStateError, RuntimeError) as error:
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _add_report(commands) -> None:
    """`ccn report`: a thin layer over analysis.write_report."""
    report = commands.add_parser("report", help="write report.md and figures from a sweep's results")
    report.add_argument("results", metavar="RESULTS", help="results root: a folder or a pyarrow filesystem URI")
    report.add_argument(
        "--spec",
        metavar="SPEC",
        help="report exactly this spec's runs (rows of earlier edits of it are ignored); default sweep: its name",
    )
    report.add_argument(
        "--sweep", metavar="NAME", help="the sweep to report (default: the spec's, else the only one in RESULTS)"
    )
    report.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and its figures")
    report.add_argument("--criterion", choices=("final_error", "auc"), default="final_error", help="selection rule")
    report.add_argument(
        "--along", metavar="PARAM", help="also plot final error against this task parameter (e.g. isi_range)"
    )


def _report(arguments) -> int:
    import analysis

    if arguments.sweep is not None and (
        not is_safe_path_component(arguments.sweep) or arguments.sweep.endswith(EVALUATION_SUFFIX)
    ):
        print(
            f"ccn: --sweep: {arguments.sweep!r} is not a sweep name (one folder name of letters, digits, '.', '_' "
            f"and '-'; name the selection sweep, its {EVALUATION_SUFFIX!r} folder is read with it)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        report = analysis.write_report(
            arguments.results,
            arguments.out,
            arguments.sweep,
            criterion=arguments.criterion,
            along=arguments.along,
            spec=arguments.spec,
        )
    except ValueError as error:
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(report.text_table)
    for note in report.notes:
        print(f"note: {note}")
    if report.biased:
        print("note: rows marked 'selection (biased)' have no evaluation runs (ccn run SPEC --stage evaluate)")
    print(f"report: {report.path}")
    print(f"\n{report.verdict}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C, `kill -INT` and `kill` (SIGTERM) stop a sweep, once and cleanly, also when started in
        # the background with SIGINT ignored (orchestrator.interrupts)
        interrupts.install()
    try:
        return COMMANDS[arguments.command](arguments)
    except SpecError as error:
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nccn: interrupted; rerun the same command to finish what is missing", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(arguments) -> int:
    from cluster import local
    from orchestrator.lease import LeaseHeld, LeaseLost
    from orchestrator.schedule import ClusterError

    local.use_recorded_auth(arguments.address)  # a `ccn cluster up` cluster: its token (docs/cluster.md)
    try:
        report = api.run_sweep(
            arguments.spec,
            arguments.results,
            address=arguments.address,
            batch_size=arguments.batch_size,
            workers=arguments.workers,
            max_attempts=arguments.max_attempts,
            max_actors=arguments.max_actors,
            actors_per_gpu=arguments.actors_per_gpu,
            wandb=arguments.wandb,
            progress=not arguments.quiet,
            stage=arguments.stage,
            takeover=arguments.takeover,
        )
    except (ClusterError, LeaseHeld) as error:
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_FAILED
    except LeaseLost as error:
        print(
            f"ccn: the sweep stopped: {error}; everything written before is kept; "
            "rerun the same command once the results are writable",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ValueError as error:  # the evaluation stage cannot start (selection unfinished)
        if isinstance(error, SpecError):
            raise
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"sweep {report.sweep!r}: {report.total} runs; {report.already_done} were already done, {report.ran} ran now "
        f"({report.diverged} diverged in all), {report.failed} failed; {report.seconds:.1f}s; "
        f"results in {report.results}"
        + (f"; {report.resumed_batches} batches resumed from checkpoints" if report.resumed_batches else "")
    )
    for failure in report.failures:
        print(f"  failed batch {failure['batch_key'][:12]} ({len(failure['run_keys'])} runs): {failure['error']}")
    if report.stopped:
        print(f"ccn: the sweep stopped: {report.stopped}; rerun the same command once that is fixed", file=sys.stderr)
    if report.interrupted:
        print("ccn: interrupted; rerun the same command to finish what is missing", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def _status(arguments) -> int:
    print(api.sweep_status(arguments.spec, arguments.results).describe())
    return EXIT_OK


def _compare(arguments) -> int:
    try:
        table = api.compare(arguments.spec, arguments.results, criterion=arguments.criterion)
    except ValueError as error:
        if isinstance(error, SpecError):
            raise
        print(f"ccn: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(api.format_comparison(table))
    return EXIT_OK


def _plan(arguments) -> int:
    plan = api.plan_sweep(arguments.spec, arguments.results, workers=arguments.workers, batch_size=arguments.batch_size)
    print(plan.describe())
    print(plan.describe_cost())
    return EXIT_OK


COMMANDS = {
    "run": _run,
    "status": _status,
    "compare": _compare,
    "plan": _plan,
    "report": _report,
    "cluster": _cluster,
    "submit": _submit,
    "wandb-sync": _wandb_sync,
}

if __name__ == "__main__":
    sys.exit(main())
