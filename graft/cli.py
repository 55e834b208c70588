"""`graft`: the user's entry point.

  graft run [-S KEY=VALUE ...] [--no-push]   the whole pipeline (Prefect flow over DVC stages)
  graft stage NAME                           one stage, through DVC
  graft serve [--cron EXPR]                  a Prefect deployment: cron schedule + UI-triggered runs
  graft data [--json]                        the data version, and what changed since the last commit
  graft sources                              pin data.source and model.ref for DVC (graft run does it)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from graft.errors import ERROR_PREFIX, GraftError

STAGE_NAMES = ("prepare", "fetch", "features", "train", "evaluate", "register")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer-learning pipeline (Prefect + DVC + MLflow).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline; DVC skips what is up to date")
    run.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a params.yaml key (written to params.yaml, like dvc exp run -S)")
    run.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    stage = sub.add_parser("stage", help="run one stage through DVC")
    stage.add_argument("name", choices=STAGE_NAMES)
    serve = sub.add_parser("serve", help="serve a Prefect deployment (schedule + UI-triggered runs)")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    serve.add_argument("--name", default="graft-scheduled", help="deployment name")
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


def _report_outcome() -> None:
    from graft.files import read_json

    for name in ("reports/transfer.json", "reports/gate.json", "reports/registration.json"):
        if not Path(name).exists():
            return
    transfer, gate, reg = (read_json(Path(f"reports/{n}.json")) for n in ("transfer", "gate", "registration"))
    fine = transfer["candidates"][transfer["proposed"]]["test"]
    print(f"\n{transfer['proposed']}: test accuracy {fine['accuracy']:.4f}, macro-F1 {fine['macro_f1']:.4f}; "
          f"margin over {transfer['best_baseline']} {transfer['margin']:+.4f}; "
          f"negative_transfer={transfer['negative_transfer']}; gate passed={gate['passed']}")
    if reg.get("registered"):
        print(f"registered {reg['model_name']} version {reg['version']} as @{', @'.join(reg['aliases'])}")
    else:
        print(f"not registered: {reg.get('reason')}")


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
    try:
        from graft import config

        config.load()  # one clear error before any machinery starts
        config.apply_overrides(getattr(args, "overrides", []), dry_run=True)
        if args.command == "run":
            from flows.pipeline import pipeline

            for name in ("prefect.task_runs", "prefect.flow_runs"):
                logging.getLogger(name).addFilter(_NoTracebackForGraftErrors())

            started = time.perf_counter()
            summary = pipeline(overrides=args.overrides, root=".", push=not args.no_push)
            _print_summary(summary, time.perf_counter() - started)
            _report_outcome()
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
            from flows.pipeline import run_dvc
            from graft.layout import Layout
            from graft.pins import write_sources

            write_sources(config.load(), Layout(Path(".")))
            run_dvc(["repro", "--single-item", args.name], Path("."), f"stage {args.name!r}")
        elif args.command == "serve":
            from flows.pipeline import pipeline

            pipeline.serve(name=args.name, cron=args.cron, parameters={"overrides": [], "root": str(Path.cwd())})
    except GraftError as err:
        sys.stderr.write(f"{ERROR_PREFIX}{err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{ERROR_PREFIX}interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
