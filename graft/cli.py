"""`graft`: the user's entry point.

  graft run [-S KEY=VALUE ...] [--no-push]   the whole pipeline (Prefect flow over DVC stages);
                                             with -S, a DVC experiment: params.yaml is not changed
  graft stage NAME                           one stage, through DVC
  graft serve [--cron EXPR]                  a Prefect deployment: cron schedule + UI-triggered runs;
                                             starts a local Prefect server unless PREFECT_API_URL is set
  graft deploy [--pool NAME] [--cron EXPR]   the deployment of prefect.yaml on a process work pool of the
                                             Prefect server at PREFECT_API_URL (workers run it here)
  graft data [--json]                        the data version, and what changed since the last commit
  graft sources                              pin data.source and model.ref for DVC (graft run does it)

Exit codes: 0 done, 2 bad input (fix it), 75 transient failure (retry unchanged), 1 internal failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from graft.errors import ERROR_PREFIX, EXIT_INTERNAL, GraftError

STAGE_NAMES = ("prepare", "fetch", "select", "features", "adapt", "curve", "domain", "train", "evaluate", "register")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer-learning pipeline (Prefect + DVC + MLflow).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline; DVC skips what is up to date")
    run.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a params.yaml key for this run only (a DVC experiment, like dvc exp run -S)")
    run.add_argument("--write-params", action="store_true",
                     help="write the -S overrides into params.yaml and run in the workspace instead")
    run.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    stage = sub.add_parser("stage", help="run one stage through DVC")
    stage.add_argument("name", choices=STAGE_NAMES)
    serve = sub.add_parser("serve", help="serve a Prefect deployment (schedule + UI-triggered runs)")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    serve.add_argument("--name", default="graft-scheduled", help="deployment name")
    serve.add_argument("--port", type=int, default=None,
                       help="port of the local Prefect server (default 4200, or a free one)")
    deploy = sub.add_parser("deploy", help="deploy the pipeline to a process work pool of a Prefect server "
                                           "(PREFECT_API_URL); `prefect worker start --pool NAME` runs it")
    deploy.add_argument("--pool", default=None, help="work pool, created when missing (default: prefect.yaml's)")
    deploy.add_argument("--name", default=None, help="deployment name (default: prefect.yaml's)")
    deploy.add_argument("--cron", default=None, help="cron schedule (default: none; runs from the UI or the API)")
    data = sub.add_parser("data", help="print the data version and what changed against the last committed dvc.lock")
    data.add_argument("--rev", default="HEAD", help="git revision to compare with (default: HEAD)")
    data.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("sources", help="resolve data.source and model.ref into data/source.yaml and models/source.yaml")
    return parser


def _print_summary(summary: list[dict], total: float) -> None:
    print("\nstage       status    seconds")
    for row in summary:
        print(f"{row['stage']:<11} {row['status']:<9} {row['seconds']:>7.1f}")
    print(f"{'total':<21} {total:>7.1f}")


def _report_outcome(summary: list[dict]) -> None:
    import json

    from graft.files import read_json
    from graft.layout import Layout

    layout = Layout(Path("."))
    reports = (layout.transfer, layout.gate, layout.registration)
    experiment = next((row["experiment"] for row in summary if row.get("experiment")), None)
    if experiment:
        # the experiment's reports live in its commit (a DVC experiment ref), not in the workspace
        from graft.runs import experiment_file

        texts = [experiment_file(Path("."), experiment, path) for path in reports]
        if all(texts):
            _print_verdict(*(json.loads(text) for text in texts))
        print(f"\nexperiment {experiment}: params.yaml unchanged; `dvc exp show` lists it, "
              f"`dvc exp apply {experiment}` brings its results into the workspace")
        return
    if all(path.exists() for path in reports):
        _print_verdict(*(read_json(path) for path in reports))


def _print_verdict(transfer: dict, gate: dict, reg: dict) -> None:
    from graft.report import verdict_sentence

    fine = transfer["candidates"][transfer["proposed"]]["test"]
    print(f"\n{verdict_sentence(transfer, transfer['proposed'])}")
    print(f"{transfer['proposed']}: test accuracy {fine['accuracy']:.4f}, macro-F1 {fine['macro_f1']:.4f}; "
          f"margin over {transfer['best_baseline']} {transfer['margin']:+.4f}; "
          f"negative_transfer={transfer['negative_transfer']}; gate passed={gate['passed']}")
    if reg.get("registered"):
        print(f"registered {reg['model_name']} version {reg['version']} as @{', @'.join(reg['aliases'])}")
        if reg.get("parity"):
            check = reg["parity"]
            print(f"served = evaluated: {check['rows']} test rows, {check['labels_differ']} labels differ, largest "
                  f"probability difference {check['max_probability_difference']:.2g} (tolerance {check['tolerance']:g})")
        if reg.get("promotion"):
            print(f"promotion: {reg['promotion']['reason']}")
    else:
        print(f"not registered: {reg.get('reason')}")


def _serve(args: argparse.Namespace) -> None:
    """Serve the deployment against PREFECT_API_URL, or a local Prefect server started here:
    Prefect's ephemeral API has no scheduler, so a schedule would never fire on it."""
    import contextlib

    from graft import servers

    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            url = stack.enter_context(servers.prefect_server(args.port))
            os.environ["PREFECT_API_URL"] = url  # before Prefect is imported: the served runs inherit it
            print(f"graft: started a local Prefect server; UI at {url.removesuffix('/api')}", flush=True)
        from flows.pipeline import pipeline

        pipeline.serve(name=args.name, cron=args.cron, parameters={"root": str(Path.cwd())})


def _deploy(args: argparse.Namespace) -> None:
    """Deploy prefect.yaml's deployment from this checkout to a process work pool."""
    import dataclasses

    from graft import deployment, servers

    spec = deployment.read_spec()
    url = deployment.prefect_api_url()
    servers.wait_http(f"{url}/health", None, 15, "the Prefect server at PREFECT_API_URL")
    spec = dataclasses.replace(spec, name=args.name or spec.name, work_pool=args.pool or spec.work_pool)
    created = deployment.ensure_process_pool(spec.work_pool)
    full_name = deployment.deploy(Path.cwd().resolve(), spec, pool=spec.work_pool, cron=args.cron)
    print(f"graft: deployed {full_name} to the {deployment.POOL_TYPE} work pool {spec.work_pool!r}"
          f"{' (created)' if created else ''} on {url}\n"
          f"  start a worker here, in this environment:  prefect worker start --pool {spec.work_pool}\n"
          f"  run it from the UI, or:  prefect deployment run '{full_name}'", flush=True)


class _NoTracebackForGraftErrors(logging.Filter):
    """Prefect logs a failed task with its traceback; input problems need only their message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], GraftError):
            record.exc_info = None
            record.exc_text = None
        return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Progress bars and Prefect logs interleave; keep Python's output unbuffered.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The embedded Prefect server runs offline by design: no failed telemetry calls in the log.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its ephemeral API to answer; a busy 2-core machine (measured: six
    # installs beside `make run`) needs longer, and the run then died as an "internal error".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        from graft import config, preflight

        params = config.load()  # one clear error before any machinery starts
        config.apply_overrides(getattr(args, "overrides", []), dry_run=True)
        preflight.check(args.command, params)
        if args.command == "run":
            from flows.pipeline import pipeline

            for name in ("prefect.task_runs", "prefect.flow_runs"):
                logging.getLogger(name).addFilter(_NoTracebackForGraftErrors())

            started = time.perf_counter()
            summary = pipeline(overrides=args.overrides, root=".", push=not args.no_push,
                               write_params=args.write_params)
            _print_summary(summary, time.perf_counter() - started)
            _report_outcome(summary)
        elif args.command == "data":
            import json

            from graft.dataversion import data_version, format_version
            from graft.layout import Layout

            info = data_version(Layout(Path(".")), rev=args.rev)
            print(json.dumps(info, indent=2) if args.json else format_version(info))
        elif args.command == "sources":
            from graft.layout import Layout
            from graft.pins import write_sources

            changed = write_sources(config.load(), Layout(Path(".")))
            print("sources: " + (", ".join(changed) + " updated" if changed else "up to date"))
        elif args.command == "stage":
            from flows.pipeline import repro_stage
            from graft.layout import Layout
            from graft.pins import write_sources

            write_sources(config.load(), Layout(Path(".")))
            repro_stage(args.name, Path("."))
        elif args.command == "serve":
            _serve(args)
        elif args.command == "deploy":
            _deploy(args)
    except GraftError as err:
        sys.stderr.write(f"{ERROR_PREFIX}{err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{ERROR_PREFIX}interrupted\n")
        return 130
    except Exception as err:  # a bug: the traceback helps a report, the last line says what
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"{ERROR_PREFIX}internal error: {type(err).__name__}: {err}\n")
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
