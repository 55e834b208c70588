"""The pipeline on a Prefect server's work pool: deployed from this checkout to a process work
pool, where `prefect worker start --pool NAME` runs each flow run in the checkout, with the
worker's own Python. `prefect.yaml` defines the deployment (its name, entrypoint and pool), so
`graft deploy` and `prefect deploy` make the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from graft.errors import GraftError

PREFECT_YAML = Path("prefect.yaml")
POOL_TYPE = "process"  # the flow runs where the checkout is: no image, no code pulled


@dataclass(frozen=True)
class DeploymentSpec:
    """The deployment `prefect.yaml` defines."""

    name: str
    entrypoint: str
    work_pool: str
    description: str | None = None


def read_spec(path: Path = PREFECT_YAML) -> DeploymentSpec:
    """The first deployment of `prefect.yaml`, with the keys graft needs."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GraftError(f"{path}: not found; graft deploy runs in a graft checkout") from None
    except yaml.YAMLError as err:
        raise GraftError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    deployments = (raw or {}).get("deployments") or [{}]
    entry = deployments[0]
    missing = [key for key in ("name", "entrypoint") if not entry.get(key)]
    pool = (entry.get("work_pool") or {}).get("name")
    if not pool:
        missing.append("work_pool.name")
    if missing:
        raise GraftError(f"{path}: deployments[0] lacks {', '.join(missing)}")
    return DeploymentSpec(name=entry["name"], entrypoint=entry["entrypoint"], work_pool=pool,
                          description=entry.get("description"))


def prefect_api_url() -> str:
    """The Prefect server's API (PREFECT_API_URL, from the environment or the Prefect profile)."""
    from prefect.settings import get_current_settings

    from graft.servers import DEFAULT_PREFECT_PORT

    url = get_current_settings().api.url
    if not url:
        raise GraftError("a work-pool deployment needs a Prefect server, and PREFECT_API_URL is not set: "
                         "start one (`prefect server start`) and export PREFECT_API_URL="
                         f"http://127.0.0.1:{DEFAULT_PREFECT_PORT}/api (Prefect's ephemeral API has no workers)")
    return url


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=POOL_TYPE, base_job_template=ProcessWorker.get_default_base_job_template()))
                return True
            except ObjectAlreadyExists:  # a worker started with --pool created it meanwhile
                pool = client.read_work_pool(name)
    if pool.type != POOL_TYPE:
        raise GraftError(f"work pool {name!r} is a {pool.type!r} pool; graft deploys to a {POOL_TYPE!r} pool "
                         f"(its workers run the flow in this checkout): name another pool")
    return False


def deploy(root: Path, spec: DeploymentSpec, *, pool: str, cron: str | None) -> str:
    """Deploy the pipeline in `root` (an absolute checkout) to `pool` and return the deployment's
    full name; the pull step a worker runs only changes into `root`. The UI's form keeps every
    typed `params` field."""
    from prefect import flow

    # loads flows/pipeline.py from the checkout, as the worker will
    pipeline = flow.from_source(source=str(root), entrypoint=spec.entrypoint)
    # to_deployment + apply, not flow.deploy: Prefect 3.8's deploy() asks for the pool's workers
    # with `limit: null`, which its own server refuses with 422 (the deployment is never made)
    runner = pipeline.to_deployment(name=spec.name, work_pool_name=pool, cron=cron, description=spec.description,
                                    parameters={"root": str(root)})
    runner.apply()
    return f"{pipeline.name}/{spec.name}"
