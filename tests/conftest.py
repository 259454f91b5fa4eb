pytest_plugins = [
    "fabflows.testing.aws_fixtures",
    "fabflows.testing.prefect_fixtures",
    "fabflows.testing.hosts_fixtures",
]
