import os
import tempfile

# Subprocess CLI calls in tests run cold: a developer's warm runner must not serve them
# (tests/fabflows/test_warm.py starts its own and clears this for its calls).
os.environ["FABFLOWS_NO_WARM"] = "1"

# Machines that set PYTHONDONTWRITEBYTECODE (CI's does) make every Python subprocess of the suite
# (the `fabflows` CLI, flows run to be killed, the sandbox daemon) compile the project's modules
# again: about a second of CPU each. The suite lets them cache their bytecode.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

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

# The longest modules first, so parallel workers (pytest -n, one file at a time) do not end with
# one of them running a long module alone. Seconds per module as measured in `make test` on 2 cores
# (a fresh clone, 941 tests; modules of 25 s and more);
# unlisted modules keep their order after these.
_MODULE_SECONDS = {
    "tests/flows/test_promote_replica.py": 175,
    "tests/flows/test_rotate_credentials.py": 166,
    "tests/flows/test_no_secret_leaks.py": 121,
    "tests/e2e/test_ui.py": 111,
    "tests/flows/test_environment_power_crash.py": 101,
    "tests/flows/test_resize_switchover.py": 97,
    "tests/flows/test_add_server.py": 95,
    "tests/sandbox/test_demo_readme.py": 94,
    "tests/flows/test_stop_environment.py": 88,
    "tests/flows/test_push_server_secrets.py": 83,
    "tests/flows/test_reload_production_db.py": 82,
    "tests/flows/test_resize_environment.py": 74,
    "tests/fabflows/test_approval.py": 72,
    "tests/flows/test_reset_replicas.py": 71,
    "tests/e2e/test_scale_out.py": 69,
    "tests/flows/test_secret_rollouts_crash.py": 68,
    "tests/flows/test_upgrade_packages_crash.py": 61,
    "tests/flows/test_update_newrelic_keys.py": 60,
    "tests/flows/test_upgrade_packages.py": 59,
    "tests/flows/test_add_replica.py": 57,
    "tests/flows/test_update_sysadmin_users_crash.py": 46,
    "tests/flows/test_refresh_sdists.py": 44,
    "tests/sandbox/test_daemon.py": 40,
    "tests/flows/test_deploy_serial.py": 40,
    "tests/flows/test_reload_production_db_crash.py": 38,
    "tests/flows/test_deploy_serial_crash.py": 36,
    "tests/fabflows/test_warm.py": 34,
    "tests/flows/test_restart_app.py": 31,
    "tests/flows/test_pull_server_secrets.py": 29,
    "tests/sandbox/test_provision.py": 28,
    "tests/fabflows/runtime/test_engine.py": 28,
    "tests/tasks/ssh/test_rabbitmq.py": 25,
}


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Longest modules first (a stable sort: a module's tests stay together and in order)."""
    items.sort(key=lambda item: -_MODULE_SECONDS.get(item.nodeid.split("::", 1)[0], 0))
