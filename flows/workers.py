"""What every task that runs a model on a Dask worker does first: its own GPU, and the flow's model.

Workers never open DuckDB; they compute, write arrays or files, and return small descriptors the
flow process commits (:mod:`safeport.flows.runner`). Multiple GPUs: on one machine,
``--dask-workers N`` puts local worker ``i`` on GPU ``i mod (GPUs it sees)`` (:func:`worker_gpu`). On
a cluster, start one single-threaded worker per device, each seeing one GPU, e.g.
``CUDA_VISIBLE_DEVICES=$i dask worker ADDRESS --nthreads 1 --nworkers 1`` per device (or
dask-cuda's ``LocalCUDACluster``), and set ``dtype:`` explicitly in the catalog when the flow
process has no GPU, so both sides derive the same representation key (a mismatch is refused by
name).
"""

from __future__ import annotations

import hashlib
import logging
import os

from safeport.extractors import ModelSource
from safeport.extractors.base import ExtractionError

log = logging.getLogger("safeport.scale")


def worker_gpu(worker_name: object, n_gpus: int) -> int | None:
    """The GPU a Dask worker should use when it sees ``n_gpus`` of them; None leaves the default.

    A local cluster names its workers 0, 1, ...: worker ``i`` takes GPU ``i mod n_gpus``,
    so ``--dask-workers N`` on an N-GPU machine is one worker per device. Other names
    (a remote worker that sees several GPUs) are spread by a stable hash of the name.
    A worker that sees one GPU or none (``CUDA_VISIBLE_DEVICES`` set per worker) is left alone.
    """
    if n_gpus <= 1:
        return None
    name = str(worker_name)
    if name.isdigit():
        return int(name) % n_gpus
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n_gpus


def _pin_worker_gpu() -> None:
    """Inside a Dask worker on a multi-GPU machine, make ``cuda`` mean this worker's own GPU.

    Also keeps the worker's Prefect traceback of a user error off the terminal a local cluster
    shares with the flow process, which reports the error once (``SAFEPORT_DEBUG=1`` keeps it).
    """
    import torch

    if not os.environ.get("SAFEPORT_DEBUG"):
        from safeport.errors import quiet_user_errors_in_flows

        quiet_user_errors_in_flows()

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not running on a Dask worker: keep the default device
        return
    gpu = worker_gpu(name, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if gpu is not None and torch.cuda.current_device() != gpu:
        torch.cuda.set_device(gpu)
        log.info("dask worker %s computes on cuda:%d", name, gpu)


def _check_key(source: ModelSource, model_key: str) -> None:
    got = source.spec().key()
    if got != model_key:
        raise ExtractionError(
            f"model {source.name!r}: this worker derives representation key {got} but the flow expects "
            f"{model_key} (device {source.device!r} / dtype {source.dtype!r} resolve differently here); "
            "set dtype: explicitly in the catalog (e.g. float32 or bfloat16) so every machine agrees"
        )


def prepare_worker(source: ModelSource, model_key: str) -> None:
    """First step of every task that runs a model on a worker: its own GPU, and the flow's model.

    Pins this worker's GPU (``cuda`` means GPU *i mod n* on worker *i*) and checks that the
    worker derives the representation key the flow planned with.
    """
    _pin_worker_gpu()
    _check_key(source, model_key)
