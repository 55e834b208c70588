"""The data-efficiency curve and the domain gap with the real backbone, in a scratch workspace:
prepare, fetch, features, then curve and domain, by their stage functions (no DVC, no MLflow).
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
import time
from pathlib import Path

from graft import config
from graft.files import read_json
from graft.layout import Layout
from graft.pins import write_sources
from tasks.curve import curve
from tasks.domain import domain
from tasks.features import features
from tasks.fetch import fetch
from tasks.prepare import prepare

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
    params = config.load(params_file)
    layout = Layout(a.workspace)
    write_sources(params, layout)
    seconds = {}
    for name, run in (
        ("prepare", lambda: prepare(params, source_file=layout.data_source_file, raw_dir=layout.raw_dir,
                                    out_dir=layout.prepared_dir, datacard_md=layout.datacard_md,
                                    plot=layout.plots_dir / "text_lengths.png")),
        ("fetch", lambda: fetch(params, source_file=layout.model_source_file, out_dir=layout.pretrained_dir)),
        ("features", lambda: features(params, pretrained_dir=layout.pretrained_dir, prepared_dir=layout.prepared_dir,
                                      out_dir=layout.features_dir, report=layout.transferability)),
        ("curve", lambda: curve(params, layout=layout)),
        ("domain", lambda: domain(params, layout=layout)),
    ):
        started = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - started, 1)
    print(json.dumps({"overrides": a.overrides, "seconds": seconds, "curve": read_json(layout.curve_report),  # noqa: T201
                      "domain": read_json(layout.domain_report)}, indent=1))


if __name__ == "__main__":
    main()
