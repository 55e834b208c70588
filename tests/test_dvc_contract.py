"""dvc.yaml tells the truth: each stage lists every file it reads (its module, the graft/ modules
it imports, its data), exactly the params it reads and every file it writes, and no stage module
imports another.

Imports are derived statically (every `import` in the module and, transitively, in the graft
modules it uses); file reads and params reads are derived by running each stage under an audit
hook and a params recorder, in a tiny workspace; writes by listing the files of the workspace
that each stage created or replaced.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from graft.layout import SPLITS

from .conftest import REPO, make_workspace, pin_sources, tiny_params

STAGES = ("prepare", "fetch", "select", "features", "adapt", "curve", "domain", "train", "evaluate", "register")
# What a stage may touch without declaring it: tracking stores and DVC's own files.
UNDECLARED_OK = ("mlruns.db", "mlartifacts", ".dvc", ".git", "params.yaml",
                 # train's resume state: deliberately not a dependency (a checkpoint is used only
                 # when its fingerprint of params and data matches, and is deleted after the save)
                 "models/checkpoints")

RECORDER = r'''
import json, os, runpy, sys
stage, out = sys.argv[1], sys.argv[2]
reads, params_read = set(), set()
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        writing = (mode and any(m in str(mode) for m in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
        if not writing:
            reads.add(os.path.abspath(os.fsdecode(path)))
sys.addaudithook(hook)
from pydantic import BaseModel
from graft import config
class Recorder:
    def __init__(self, obj, prefix):
        self._obj, self._prefix = obj, prefix
    def __getattr__(self, name):
        value = getattr(self._obj, name)
        if name.startswith("model_"):
            params_read.add(self._prefix or "*")
            return value
        key = f"{self._prefix}.{name}" if self._prefix else name
        if isinstance(value, BaseModel):
            return Recorder(value, key)
        params_read.add(key)
        return value
_load = config.load
config.load = lambda *a, **k: Recorder(_load(*a, **k), "")
try:
    runpy.run_module(f"tasks.{stage}", run_name="__main__")
finally:
    with open(out, "w") as handle:
        json.dump({"reads": sorted(reads), "params": sorted(params_read)}, handle)
'''


def module_file(name: str, root: Path = REPO) -> Path | None:
    path = root / Path(*name.split("."))
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Every graft/tasks module named by an import statement anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in ("graft", "tasks") and module_file(n)}


def import_closure(stage: str) -> set[str]:
    """The stage module and every graft module it reaches, as repository-relative files."""
    todo, seen = [f"tasks.{stage}"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing graft.x imports graft/__init__.py first
            seen.add(".".join(parts[:i]))
        todo += sorted(imported_modules(module_file(name)))
    return {module_file(n).relative_to(REPO).as_posix() for n in seen if module_file(n)}


def declared(stage_spec: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage_spec.get("deps", [])]


def outputs(stage_spec: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o
            for kind in ("outs", "metrics", "plots") for o in stage_spec.get(kind, [])]


def covered(path: str, entries: list[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in entries)


def contract_gaps(stage: str, spec: dict, *, imports: set[str], reads: list[str], params_read: list[str],
                  sections: list[str], writes: list[str]) -> list[str]:
    """Everything the stage uses or writes that its dvc.yaml entry does not declare (and declared
    params it never reads, declared outputs it never writes)."""
    deps, outs = declared(spec), outputs(spec)
    gaps = [f"{stage}: imports {m} but dvc.yaml does not list it" for m in sorted(imports) if not covered(m, deps)]
    gaps += [f"{stage}: reads {r} but dvc.yaml does not list it" for r in reads
             if not covered(r, deps) and not covered(r, outs) and not r.startswith(UNDECLARED_OK)]
    wanted = [str(p) for p in spec.get("params", [])]
    used = sections if "*" in params_read else params_read
    gaps += [f"{stage}: reads param {p} but dvc.yaml does not list it" for p in used
             if not any(p == w or p.startswith(w + ".") for w in wanted)]
    gaps += [f"{stage}: lists param {w} but never reads it" for w in wanted
             if not any(p == w or p.startswith(w + ".") for p in used)]
    gaps += [f"{stage}: writes {w} but dvc.yaml does not declare it as an output" for w in writes
             if not covered(w, outs) and not w.startswith(UNDECLARED_OK)]
    gaps += [f"{stage}: declares output {o} but never writes it" for o in outs if not any(covered(w, [o]) for w in writes)]
    return gaps


def files_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the workspace (code caches aside) with what changes when it is written."""
    state = {}
    for path in root.rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        st = path.stat()
        state[path.relative_to(root).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return state


def test_no_stage_module_imports_another():
    for stage in STAGES:
        others = {m for m in imported_modules(REPO / "tasks" / f"{stage}.py") if m.startswith("tasks.")}
        assert others <= {"tasks"}, f"tasks/{stage}.py imports {others}"


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_model_dir) -> dict:
    """Each stage run once in a tiny workspace, in pipeline order, with its reads recorded."""
    params = tiny_params(tiny_model_dir)
    params["data"]["group_columns"] = ["region"]  # evaluate's per-group branch writes too
    # the optional stages on, so they read every param they declare: a fine-tuned curve point and
    # a second domain (a column of its own: region is a group column); adaptation on, so adapt
    # and train read everything dvc.yaml lists for them
    params["curve"].update(enabled=True, sizes=[2, 4], seeds=2, seeds_below=4, finetune_sizes=[2])
    frame = pd.read_csv(params["data"]["source"])
    frame["site"] = ["a", "b"] * (len(frame) // 2)
    source = tmp_path_factory.mktemp("contract-data") / "news_sites.csv"
    frame.to_csv(source, index=False)
    params["data"].update(source=str(source), domain_column="site")
    params["domain"].update(target="b", permutations=19)
    base = tmp_path_factory.mktemp("contract")
    unlabelled = base / "unlabelled.csv"
    unlabelled.write_text("text\nnew words about the kitchen bread today.\nthe match team won the phone cloud.\n")
    params["data"]["unlabelled_source"] = str(unlabelled)
    params["adapt"]["methods"] = ["mlm", "self_training"]
    params["adapt"]["mlm"]["batch_size"] = 8
    root = make_workspace(base / "ws", params)
    pin_sources(root)
    script = root.parent / "recorder.py"
    script.write_text(RECORDER)
    sources = {**yaml.safe_load((root / "data/source.yaml").read_text()),
               **yaml.safe_load((root / "models/source.yaml").read_text())}
    traces = {}
    for stage in STAGES:
        out = root.parent / f"{stage}.json"
        before = files_state(root)
        proc = subprocess.run([sys.executable, str(script), stage, str(out)], cwd=root, capture_output=True,
                              text=True, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": ""})
        assert proc.returncode == 0, proc.stderr[-2000:]
        after = files_state(root)
        writes = sorted(p for p, state in after.items() if before.get(p) != state)
        trace = json.loads(out.read_text())
        reads = []
        for path in trace["reads"]:
            p = Path(path)
            if p.suffix in (".py", ".pyc") or "__pycache__" in p.parts:
                continue  # code is checked statically below
            if any(part.startswith(".") and part.endswith(".tmp") for part in p.parts):
                continue  # a stage's own atomic-write temporaries
            if p.is_relative_to(root):
                if p.exists():  # MLflow opens scratch names relative to its own temporary folders
                    reads.append(p.relative_to(root).as_posix())
            else:
                for key in ("data_source", "model_source"):
                    if sources[key] and p.is_relative_to(Path(sources[key])):
                        reads.append(str(p))
        traces[stage] = {"reads": sorted(set(reads)), "params": trace["params"], "writes": writes}
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    for stage in spec["stages"].values():  # resolve ${data_source} / ${model_source}
        stage["deps"] = [sources[d[2:-1]] if str(d).startswith("${") else d for d in stage.get("deps", [])]
    return {"root": root, "traces": traces, "spec": spec}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_declares_everything_the_stage_reads_and_writes(traced: dict, stage: str):
    spec = traced["spec"]["stages"][stage]
    trace = traced["traces"][stage]
    sections = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    gaps = contract_gaps(stage, spec, imports=import_closure(stage), reads=trace["reads"],
                         params_read=trace["params"], sections=sections, writes=trace["writes"])
    assert gaps == [], "\n".join(gaps)
    assert trace["reads"], f"{stage} read no file at all: the recorder is broken"
    assert trace["writes"], f"{stage} wrote no file at all: the snapshot is broken"


def test_the_check_fails_when_one_dependency_is_removed(traced: dict):
    """Remove each declared dependency of `train` in turn: the check names every one."""
    sections = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    spec = traced["spec"]["stages"]["train"]
    trace = traced["traces"]["train"]
    for removed in declared(spec):
        mutated = {**spec, "deps": [d for d in spec["deps"] if d != removed]}
        gaps = contract_gaps("train", mutated, imports=import_closure("train"), reads=trace["reads"],
                             params_read=trace["params"], sections=sections, writes=trace["writes"])
        assert any(removed in gap for gap in gaps), f"removing {removed} went unnoticed"
    mutated = {**spec, "params": [p for p in spec["params"] if p != "train"]}
    assert any("reads param train." in g for g in contract_gaps(
        "train", mutated, imports=import_closure("train"), reads=trace["reads"], params_read=trace["params"],
        sections=sections, writes=trace["writes"]))


@pytest.mark.parametrize("stage", STAGES)
def test_the_check_fails_when_one_output_is_removed(traced: dict, stage: str):
    """Remove each declared output of the stage in turn: the check names the files it writes there."""
    sections = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    spec = traced["spec"]["stages"][stage]
    trace = traced["traces"][stage]
    for removed in outputs(spec):
        mutated = {kind: [o for o in spec.get(kind, []) if (next(iter(o)) if isinstance(o, dict) else o) != removed]
                   for kind in ("outs", "metrics", "plots")}
        gaps = contract_gaps(stage, {**spec, **mutated}, imports=import_closure(stage), reads=trace["reads"],
                             params_read=trace["params"], sections=sections, writes=trace["writes"])
        assert any(f"writes {removed}" in gap and "does not declare it" in gap for gap in gaps), \
            f"removing output {removed} of {stage} went unnoticed"


def readme_stage_table(text: str) -> dict[str, list[str]]:
    """The README's stage table as {stage: every path its `writes` column names}, braces and
    `<split>` expanded."""
    def expand(path: str) -> list[str]:
        match = re.search(r"\{([^{}]*)\}", path)
        if match:
            return [p for alt in match[1].split(",") for p in expand(path[:match.start()] + alt + path[match.end():])]
        return [path.replace("<split>", s) for s in SPLITS] if "<split>" in path else [path.rstrip("/")]

    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in STAGES:
            rows[cells[0]] = [p for token in re.findall(r"`([^`]+)`", cells[2]) if "/" in token for p in expand(token)]
    return rows


def test_the_readme_stage_table_names_what_each_stage_writes():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    table = readme_stage_table((REPO / "README.md").read_text())
    assert set(table) == set(STAGES)
    for stage, named in table.items():
        outs = outputs(spec[stage])
        assert [p for p in named if not covered(p, outs)] == [], f"README: {stage} does not write these"
        assert [o for o in outs if not any(covered(p, [o]) for p in named)] == [], f"README: {stage}'s table row misses"


def test_the_readme_check_fails_on_a_path_no_stage_writes():
    text = (REPO / "README.md").read_text().replace("`reports/report.html`", "`reports/plots/confusion_matrix.png`")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    named = readme_stage_table(text)["evaluate"]
    assert "reports/plots/confusion_matrix.png" in named and not covered("reports/plots/confusion_matrix.png",
                                                                         outputs(spec["evaluate"]))
    assert not any(covered(p, ["reports/report.html"]) for p in named)
