import os
import tempfile

# Subprocess CLI calls in tests run cold: a developer's warm runner must not serve them
# (tests/fabflows/test_warm.py starts its own and clears this for its calls).
os.environ["FABFLOWS_NO_WARM"] = "1"

# Locks and journals of configs that name no state_dir go to this session's own directory, never
# to the operator's ~/.local/state/fabflows (a dead test run there would be "recovered" by the next).
# Parallel workers (pytest -n) inherit the controller's and each take a subdirectory of it.
if "FABFLOWS_STATE_DIR" not in os.environ:
    os.environ["FABFLOWS_STATE_DIR"] = tempfile.mkdtemp(prefix="fabflows-test-state-")
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker:
    os.environ["FABFLOWS_STATE_DIR"] = os.path.join(os.environ["FABFLOWS_STATE_DIR"], _worker)

# Parallel workers (pytest -n): each takes its own test network, so their hosts never collide.
# Worker N uses "<prefix>N" and the subnet's third octet + N + 1 (ft -> ft0, ft1; 10.203.1, 10.203.2).
if _worker.startswith("gw"):
    _n = int(_worker[2:])
    _prefix = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "ft")
    _a, _b, _c = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.203.0").split(".")
    os.environ["FABFLOWS_TEST_NET_PREFIX"] = f"{_prefix}{_n}"
    os.environ["FABFLOWS_TEST_NET_SUBNET"] = f"{_a}.{_b}.{int(_c) + _n + 1}"

pytest_plugins = [
    "fabflows.testing.aws_fixtures",
    "fabflows.testing.prefect_fixtures",
    "fabflows.testing.hosts_fixtures",
]
