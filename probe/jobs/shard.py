"""The grid's (fact, defense) units spread over Ray workers (``probe-attack grid --workers N`` /
``--ray-address ADDR``).

The driver (the ``grid`` command's process) keeps everything that is done once: the known-fact
filter, the plan, the output files. Each worker is a Ray actor that builds its own model once
(``model_factory``; with CUDA one GPU per worker, ``num_gpus=1``) and then runs work items:

* ``pre`` -- :func:`~.deletion.measure_pre` of one fact on the unedited model;
* ``unit`` -- one (fact, defense) deletion, :meth:`.grid.UnitContext.unit`, the same code the
  serial grid runs, given that fact's pre measurement.

The driver hands an idle worker the next item: first the units of facts whose pre measurement is
in (oldest fact first), then the next fact's ``pre``. Results are written by the driver as they
arrive (``pre.jsonl``, ``units.jsonl``; ``grid.json`` after each finished fact), so an interrupted
sharded grid resumes like a serial one, under any worker count. A worker that dies (its process
killed, its node lost) has its item given to a fresh worker; an item is written once, when it
finishes, so nothing is lost or written twice. Ray is optional (``pip install probe-attack[ray]``)
and imported only here.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, Sequence

import torch

from ..facts import Fact
from ..interrupt import check as check_interrupt
from ..results import FactResult, PreMeasure
from .deletion import Plan, measure_pre
from .output import RunError

#: How often one item may lose its worker before the grid stops (a unit that kills every worker it
#: touches, e.g. by running out of memory, must not loop forever).
MAX_ITEM_RETRIES = 3


class GridWorker:
    """One Ray worker of a sharded grid: a model of its own and the grid's unit context. Runs
    ``pre`` and ``unit`` items (see the module docstring); results go back as JSON records."""

    def __init__(self, model_factory: Callable[[], Any], unit_ctx, pre_ctx, threads: int):
        torch.set_num_threads(max(1, int(threads)))
        self.model = model_factory()
        self.units, self.pre_ctx = unit_ctx, pre_ctx

    def pre(self, fact: Fact, read, lens_out) -> dict:
        u = self.units
        return measure_pre(self.model, fact, read, lens_out, u.plan, self.pre_ctx, u.cfg).to_json()

    def unit(self, fact: Fact, pre: PreMeasure, defense: str) -> dict:
        return self.units.unit(self.model, fact, pre, defense).to_json()


def copy_factory(model) -> Callable[[], Any]:
    """A picklable factory that rebuilds ``model`` in a worker from its Hugging Face model and
    tokenizer (the weights travel through Ray's object store; for models on disk prefer
    ``functools.partial(probe.load_model, name)``, which each worker loads itself)."""
    from ..model import wrap_model

    return functools.partial(wrap_model, model.hf, model.tokenizer, name=model.name, fingerprint=model.fingerprint,
                             processor=model.processor)


def check_ray(workers: int | None):
    """Before anything is written: Ray is importable and ``workers`` (if given) is >= 1.

    Returns:
        The ``ray`` module.

    Raises:
        RunError: naming the flag and the fix.
    """
    if workers is not None and workers < 1:
        raise RunError("--workers must be >= 1")
    return _ray()


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise RunError("--workers / --ray-address need Ray: pip install 'probe-attack[ray]'") from None
    return ray


def connect_ray(workers: int | None, address: str | None) -> bool:
    """Start a local Ray instance (``workers`` CPUs) or join ``address``, unless Ray is already up.
    ``grid`` calls this before it writes anything, so a cluster it cannot reach leaves no folder.

    Returns:
        True when this call started or joined Ray (the caller shuts it down), False when Ray was
        already initialised by the caller.

    Raises:
        RunError: Ray is missing, or could not start or connect (one line naming the flag).
    """
    ray = check_ray(workers)
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    if address is None:
        kwargs.update(num_cpus=workers or os.cpu_count() or 1, object_store_memory=256 * 1024 ** 2)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"--ray-address {address}" if address else "a local Ray instance"
        raise RunError(f"{where}: Ray could not start or connect ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return True


def shutdown_ray() -> None:
    """Stop the Ray instance :func:`connect_ray` started (for a caller that fails before
    :func:`run_sharded` takes it over)."""
    import ray

    ray.shutdown()


def run_sharded(model_factory: Callable[[], Any] | None, plan: Plan, cfg, facts: Sequence[Fact], known: Sequence[tuple],
                defenses: Sequence[str], pre_done: dict[str, PreMeasure], done_units: set, pre_ctx, *,
                record_pre: Callable[[PreMeasure], None], record_unit: Callable[[FactResult], None],
                on_fact_done: Callable[[], Any], workers: int | None = None, address: str | None = None,
                on_dispatch: Callable[[Any, tuple], None] | None = None, model=None,
                owns_ray: bool | None = None) -> None:
    """Run every unfinished (fact, defense) unit of ``known`` (and each fact's pre measurement if
    missing) on Ray workers, recording each as it finishes.

    Args:
        model_factory: builds the worker's model (a :class:`probe.model.ProbeModel`); must be
            picklable (e.g. ``functools.partial(probe.load_model, "smollm2-135m")``).
        known: ``[(fact, logit-lens readout, {lens attack: pre outcome}), ...]`` from the
            known-fact filter, in grid order.
        pre_done, done_units: what is already on disk (resume): fact id -> pre measurement, and
            ``{(defense, fact id)}``.
        record_pre, record_unit: write one result (called in the driver, in finishing order).
        on_fact_done: called when every unit of a fact is recorded (rewrites ``grid.json``).
        workers: number of workers (default: 1 per GPU on CUDA, else 1 per CPU of the Ray
            instance).
        address: an existing Ray cluster to join (``ray.init(address=...)``); without it a local
            Ray instance with ``workers`` CPUs is started and shut down at the end. In a Ray the
            caller started (or joined) it stays up; the workers end with this call.
        on_dispatch: called with (worker, item) when an item is handed out (tests use it to kill a
            worker mid-item).
        owns_ray: Ray was already connected by :func:`connect_ray`, which returned this (True:
            shut it down at the end); None: connect here.

    Raises:
        RunError: Ray is not installed, cannot start or reach ``address``, ``workers`` < 1, or one
            item lost its worker :data:`MAX_ITEM_RETRIES` times.
        KeyboardInterrupt: on Ctrl-C (at the next result); what finished is on disk.
    """
    from .grid import UnitContext

    ray = check_ray(workers)
    if model_factory is None and model is None:
        raise ValueError("run_sharded needs model_factory or model")
    cuda = model is not None and model.device.type == "cuda"
    started = connect_ray(workers, address) if owns_ray is None else owns_ray
    try:
        if model_factory is None:
            model_factory = copy_factory(model)
        res = ray.cluster_resources()
        n = workers or max(1, int(res.get("GPU", 0) if cuda else res.get("CPU", 1)))
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0)(GridWorker)
        # shipped once to the object store; Ray hands each new worker the stored copies
        refs = [ray.put(x) for x in (model_factory, UnitContext(plan, cfg), pre_ctx)]

        def spawn():
            return actor_cls.remote(*refs, 1)

        by_id = {f.id: (f, r, lo) for f, r, lo in known}
        order = [f.id for f, _, _ in known]
        todo = {fid: [d for d in defenses if (d, fid) not in done_units] for fid in order}
        pending_pre = collections.deque(fid for fid in order if todo[fid] and fid not in pre_done)
        ready = collections.deque(("unit", fid, d) for fid in order if fid in pre_done for d in todo[fid])
        left = {fid: len(todo[fid]) for fid in order if todo[fid]}
        retries: collections.Counter = collections.Counter()
        # workers live as long as their handles (Ray's reference counting): here, until this returns
        idle = [spawn() for _ in range(min(n, max(1, len(ready) + len(pending_pre))))]
        inflight: dict = {}

        def next_item():
            if ready:
                return ready.popleft()
            if pending_pre:
                return ("pre", pending_pre.popleft())
            return None

        def dispatch(actor, item):
            fact, read, lens_out = by_id[item[1]]
            ref = (actor.pre.remote(fact, read, lens_out) if item[0] == "pre" else
                   actor.unit.remote(fact, pre_done[item[1]], item[2]))
            inflight[ref] = (actor, item)
            if on_dispatch is not None:
                on_dispatch(actor, item)

        while True:
            while idle:
                item = next_item()
                if item is None:
                    break
                dispatch(idle.pop(), item)
            if not inflight:
                break
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            check_interrupt()
            if not done:
                continue
            ref = done[0]
            actor, item = inflight.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker died: redo its item on a fresh one
                retries[item] += 1
                if retries[item] >= MAX_ITEM_RETRIES:
                    raise RunError(f"{item[0]} of fact {item[1]}{' / ' + item[2] if item[0] == 'unit' else ''} "
                                   f"lost its worker {retries[item]} times; last: {type(exc).__name__}") from None
                ray.kill(actor, no_restart=True)
                idle.append(spawn())
                (ready if item[0] == "unit" else pending_pre).appendleft(item if item[0] == "unit" else item[1])
                continue
            except ray.exceptions.RayTaskError as exc:  # a bug in the unit: surface the original error
                raise exc.as_instanceof_cause() from None
            idle.append(actor)
            fid = item[1]
            if item[0] == "pre":
                record_pre(PreMeasure.from_json(record))
                # this fact's units go before newer facts' pre measurements, after older facts' units
                ready.extend(("unit", fid, d) for d in todo[fid])
            else:
                record_unit(FactResult.from_json(record))
                left[fid] -= 1
                if left[fid] == 0:
                    on_fact_done()
    finally:
        if started:
            ray.shutdown()
