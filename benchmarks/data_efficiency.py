"""The data-efficiency curve and the domain gap with the real backbone, in a scratch workspace:
prepare, fetch, select, features, then curve and domain, by their entry points (benchmarks/stages.py:
no DVC, no MLflow).
The workspace gets this checkout's params.yaml with the overrides given; its reports are printed
as JSON at the end.

    python benchmarks/data_efficiency.py --workspace /tmp/bbc -S data.train_size=1000 -S curve.enabled=true
    python benchmarks/data_efficiency.py --workspace /tmp/kitchen -S data.source=/path/kitchen.csv \\
        -S data.train_size=1000 -S curve.enabled=true
    python benchmarks/data_efficiency.py --workspace /tmp/shift -S data.source=/path/books_kitchen.csv \\
        -S data.domain_column=domain -S domain.target=kitchen -S data.train_size=1000
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from stages import run_stages  # benchmarks/stages.py (the script's folder is on sys.path)

from graft import config
from graft.files import read_json
from graft.layout import Layout

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("-S", dest="overrides", action="append", default=[])
    a = p.parse_args()
    a.workspace.mkdir(parents=True, exist_ok=True)
    params_file = a.workspace / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    config.apply_overrides(a.overrides, params_file)
    seconds = run_stages(a.workspace, ("prepare", "fetch", "select", "features", "curve", "domain"))
    layout = Layout(a.workspace)
    print(json.dumps({"overrides": a.overrides, "seconds": seconds, "curve": read_json(layout.curve_report),  # noqa: T201
                      "domain": read_json(layout.domain_report)}, indent=1))


if __name__ == "__main__":
    main()
