"""Every Prefect task of the product caches nothing by its inputs.

fabflows never reuses a task's result because its inputs look the same (a second "pause pgbouncer"
in one run must pause it again; resuming a run is the journal's job). Prefect's default policy
still computes a key from the inputs of every call, and for a task given the run's SSH connections
(unhashable) it logs an ERROR with a traceback on each call ("Error encountered when computing
cache key"), in the operator's terminal and in the UI's run log, though nothing failed.
"""

from __future__ import annotations

import importlib
import pkgutil

from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task

PACKAGES = ("tasks", "fabflows", "flows")


def _product_tasks() -> list[tuple[str, Task]]:
    found = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if info.name.startswith("fabflows.testing"):
                continue  # the test lab, not shipped
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if isinstance(obj, Task) and obj.fn.__module__ == info.name:
                    found.append((f"{info.name}:{obj.name}", obj))
    return found


def test_every_task_caches_nothing_by_its_inputs() -> None:
    tasks = _product_tasks()
    assert len(tasks) > 100  # the walk found the product's tasks
    cached = [name for name, t in tasks if t.cache_policy is not NO_CACHE]
    assert not cached, f"tasks without cache_policy=NO_CACHE: {cached}"
