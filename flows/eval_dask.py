"""``safeport eval`` on Dask: the same sweep, with each chunk of prompts generated and scored on a worker.

Nothing here is a second implementation of generation: :func:`safeport.flows.eval.eval_flow` run on a
``DaskTaskRunner`` hands the one generation stage (:mod:`safeport.flows.eval_generate`) to the runner's
Dask executor. The flow process plans every output exactly as one process does (same content keys,
same pipeline calls), claims each chunk's outputs and sends a worker the chunk: whole prompts (their
texts, so each worker encodes a prompt once), the output specs per pipeline call and the steering
vectors they use. A worker loads the pipeline once and keeps it for all its chunks, generates, writes
the PNGs to the store's outputs location, scores the images it holds and returns descriptors (key,
files, checksum, seconds, scores); the flow process re-reads each file, checks its checksum and
commits outputs and scores in one transaction per chunk. Workers never open DuckDB.

A worker that dies loses only the chunk in flight (Dask runs it again on another worker); if the flow
process dies its claims die with it, so the rerun (or another writer) makes exactly the outputs that
were not committed. Workers must reach the store's outputs location (a local cluster does; a remote
one needs the store folder on a shared filesystem, or an ``outputs:`` URL in the profile). Progress:
one ``runs`` row per worker (``generate@<worker>``) with its rate and projected share
(:func:`safeport.flows.runner.share_workers`).
"""

from __future__ import annotations

from typing import Any

from safeport.flows.eval import EvalResult, eval_flow
from safeport.flows.runner import share_workers as share_workers
from safeport.flows.scale import dask_task_runner


def eval_on_dask(address: str | None = None, workers: int = 2, **kwargs: Any) -> EvalResult:
    """:func:`safeport.flows.eval.eval_flow` on a Dask cluster (``address``) or a local one of ``workers`` processes."""
    result: EvalResult = eval_flow.with_options(task_runner=dask_task_runner(address, workers))(**kwargs)
    return result
