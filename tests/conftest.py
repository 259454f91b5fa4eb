import os

# Subprocess CLI calls in tests run cold: a developer's warm runner must not serve them
# (tests/fabflows/test_warm.py starts its own and clears this for its calls).
os.environ["FABFLOWS_NO_WARM"] = "1"

pytest_plugins = [
    "fabflows.testing.aws_fixtures",
    "fabflows.testing.prefect_fixtures",
    "fabflows.testing.hosts_fixtures",
]
