"""The grid sharded over Ray workers (``probe-attack grid --workers N``), on a local Ray instance
with 2 workers and a tiny model: the same cells and units as the serial grid, a killed worker's
unit redone (nothing lost, nothing written twice), resume across worker counts.

Ray is an optional extra; the README's test set-up installs it, so these tests run (and fail
without it)."""

from __future__ import annotations

import json
import shutil

import pytest
import ray
import torch

from probe.facts import Fact
from probe.jobs import PRE, UNITS, GridConfig, run_grid

FACTS = [
    Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of"],
         neighborhood=[{"prompt": "The capital of Japan is", "answer": "Tokyo"}], alt_answer="Rome"),
    Fact("jp", "The capital of Japan is", "Tokyo", neighborhood=[{"prompt": "The capital of France is", "answer": "Paris"}]),
    Fact("water", "Water is made of hydrogen and", "oxygen"),
]
TIMING = ("seconds", "mean_edit_seconds", "seconds_this_session")


def _cfg():
    return GridConfig(defenses=["fact-erasure", "error-injection"], attacks=["head-projection", "probability-delta"],
                      editor_config=dict(layer=0, lr=5e-2, norm_bound=1.0, steps=4), known_rank=10 ** 6,
                      random_n=2, acc_tokens=2, gen_tokens=3, progress=False)


def _strip(x):
    """A record without its wall-clock timings (which differ run to run)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _units(folder):
    recs = [json.loads(x) for x in (folder / UNITS).read_text().splitlines()]
    return sorted((_strip(r) for r in recs), key=lambda r: (r["id"], r["defense"]))


@pytest.fixture(scope="module")
def one_thread():
    """Ray workers run one torch thread each; the serial reference does too, so both sum floats in
    the same order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def serial(make_tiny, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "g"
    model = make_tiny("llama")
    res = run_grid(model, FACTS, out, _cfg())
    return out, res, model


def test_two_workers_write_the_serial_grids_cells_and_units(make_tiny, serial, tmp_path):
    ref_out, ref, _ = serial
    res = run_grid(make_tiny("llama"), FACTS, tmp_path / "g", _cfg(), workers=2)
    assert len(res.cells) == 4 and res.complete
    assert _strip(res.to_dict()["cells"]) == _strip(ref.to_dict()["cells"])
    assert _units(tmp_path / "g") == _units(ref_out)
    assert len((tmp_path / "g" / PRE).read_text().splitlines()) == 3
    assert not ray.is_initialized()  # the local instance the grid started is shut down


def test_a_killed_worker_has_its_unit_redone_once(make_tiny, serial, tmp_path):
    ref_out, ref, _ = serial
    killed = []

    def kill_first_unit(worker, item):
        if item[0] == "unit" and not killed:
            killed.append(item)
            ray.kill(worker, no_restart=True)  # the worker dies with the unit in flight

    res = run_grid(make_tiny("llama"), FACTS, tmp_path / "g", _cfg(), workers=2, on_dispatch=kill_first_unit)
    assert killed and killed[0][0] == "unit"
    units = _units(tmp_path / "g")
    assert [(u["id"], u["defense"]) for u in units] == sorted(
        (f.id, d) for f in FACTS for d in ("fact-erasure", "error-injection"))  # none lost, none twice
    assert units == _units(ref_out)
    assert _strip(res.to_dict()["cells"]) == _strip(ref.to_dict()["cells"])


def test_a_serial_grid_resumes_on_two_workers(serial, tmp_path):
    ref_out, ref, model = serial
    out = tmp_path / "g"
    shutil.copytree(ref_out, out)
    lines = (out / UNITS).read_text().splitlines()
    (out / UNITS).write_text("\n".join(lines[:3]) + "\n")  # stopped after 3 of 6 units
    pre = (out / PRE).read_text().splitlines()
    (out / PRE).write_text("\n".join(pre[:2]) + "\n")  # ... and 2 of 3 pre measurements
    res = run_grid(model, FACTS, out, _cfg(), resume=True, workers=2)  # the same model: resume checks its fingerprint
    assert _units(out) == _units(ref_out)
    assert _strip(res.to_dict()["cells"]) == _strip(ref.to_dict()["cells"])


def test_workers_must_be_positive(make_tiny, tmp_path):
    from probe.jobs.output import RunError

    with pytest.raises(RunError, match="--workers must be >= 1"):
        run_grid(make_tiny("llama"), FACTS, tmp_path / "g", _cfg(), workers=0)
    assert not (tmp_path / "g").exists()  # refused before anything is written


def test_in_a_ray_the_caller_started_the_workers_are_freed_and_ray_stays_up(make_tiny, serial, tmp_path):
    """A notebook's own ``ray.init``: the grid uses it, leaves it running, and kills its workers at
    the end (their CPUs are free again), with the serial grid's cells."""
    import time

    ref_out, ref, _ = serial
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = run_grid(make_tiny("llama"), FACTS, tmp_path / "g", _cfg(), workers=2)
        assert ray.is_initialized()
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 2
        assert _strip(res.to_dict()["cells"]) == _strip(ref.to_dict()["cells"])
    finally:
        ray.shutdown()
