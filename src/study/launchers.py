"""Where a study's runs execute: worker processes on this machine (``local``), or Ray tasks on a
local Ray instance or a Ray cluster (``ray``). Both yield each run's result as it finishes, in the
same form, so the study's progress, summary and resume are the same on either.

Ray is used as it is: each run is one task with the resources asked for (``num_cpus``,
``num_gpus``); Ray places the tasks on the cluster's nodes. With no address the study starts a
local instance (no dashboard) and shuts it down at the end; with one (``auto`` included) it joins
that cluster and leaves it running. A local instance keeps Ray 2.60's token authentication on: its
processes listen on every interface (Ray's choice), and the token guards them. The runs write their
TensorBoard logs and results under the study's output folder, which on a cluster must be on a
filesystem every node shares (as the repository must: each task imports it from the same path).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

LAUNCHERS = ("local", "ray")
REPO = Path(__file__).resolve().parents[2]


class LaunchError(ValueError):
    """The launcher cannot start (Ray missing, an address that does not answer): one line for the user."""


class LocalLauncher:
    """``workers`` spawned processes on this machine."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> str:
        return f"{self.workers} processes"

    def run(self, fn: Callable[..., Any], jobs: list[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        """``fn(*args)`` for each ``(key, args)`` of ``jobs``; yields ``(key, result or exception)`` as
        each finishes."""
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {self._pool.submit(fn, *args): key for key, args in jobs}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as err:  # a run that failed, or a worker that died
                yield futures[future], err

    def cancel(self) -> None:
        """Drop the runs not started and kill the ones in flight (SIGKILL: a run's own SIGTERM
        handler would finish its epoch first; an unfinished run is run again on resume anyway)."""
        if self._pool is not None:
            running = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in running:
                process.kill()
                process.join(timeout=10)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class RayLauncher:
    """Each run a Ray task of ``cpus`` CPUs and ``gpus`` GPUs, on the cluster at ``address`` or, with
    none, on a local instance of ``workers * cpus`` CPUs (so that ``workers`` runs go at once)."""

    def __init__(self, workers: int, address: str | None = None, cpus: int = 1, gpus: float = 0) -> None:
        self.workers, self.address, self.cpus, self.gpus = workers, address, cpus, gpus
        self._refs: dict[Any, Any] = {}
        self._ray: Any = None
        self._started = False

    def start(self) -> str:
        try:
            import ray
        except ImportError:
            raise LaunchError("--launcher ray needs Ray: pip install -e '.[ray]' (or 'ray>=2.60')") from None
        if self.address not in (None, "auto"):
            reachable(self.address)
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "runtime_env": {"env_vars": env}}
        if self.address is None:
            kwargs["num_cpus"] = self.workers * self.cpus
            if self.gpus:
                kwargs["num_gpus"] = max(1, int(self.workers * self.gpus))
        try:
            ray.init(address=self.address, **kwargs)
        except ConnectionError as err:
            raise LaunchError(
                f"--address {self.address}: no Ray cluster ({err}); start one with ray start --head"
            ) from None
        self._ray, self._started = ray, self.address is None
        where = "a local Ray instance" if self.address is None else f"the Ray cluster at {self.address}"
        return f"Ray tasks of {self.cpus} CPU(s), {self.gpus:g} GPU(s) each on {where}"

    def run(self, fn: Callable[..., Any], jobs: list[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        ray = self._ray
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(fn)
        self._refs = {task.remote(*args): key for key, args in jobs}
        while self._refs:
            ready, _ = ray.wait(list(self._refs), num_returns=1)
            key = self._refs.pop(ready[0])
            try:
                yield key, ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:  # the run's own exception, as it was raised
                yield key, err.as_instanceof_cause()
            except Exception as err:  # a lost worker or node
                yield key, err

    def cancel(self) -> None:
        for ref in list(self._refs):
            self._ray.cancel(ref, force=True)
        self._refs = {}

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
        self._started = False


def reachable(address: str, timeout: float = 3.0) -> None:
    """Raise :class:`LaunchError` unless ``host:port`` accepts a TCP connection within ``timeout``
    seconds (Ray itself would retry for a minute)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--address must be host:port (a Ray head, e.g. 10.0.0.1:6379) or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise LaunchError(f"--address {address}: nothing answers there ({err.strerror or err}); "
                          "start the head with ray start --head, or check the host and port") from None  # fmt: skip


def make_launcher(name: str, workers: int, address: str | None, cpus: int, gpus: float):
    if name not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {name!r}")
    if cpus < 1:
        raise LaunchError(f"--cpus-per-run must be >= 1, got {cpus}")
    if gpus < 0:
        raise LaunchError(f"--gpus-per-run must be >= 0, got {gpus}")
    if name == "local":
        if address is not None:
            raise LaunchError("--address is for --launcher ray")
        return LocalLauncher(workers)
    return RayLauncher(workers, address, cpus, gpus)
