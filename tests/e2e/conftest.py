from fabflows.testing.pgcluster import pg_cluster  # noqa: F401 - fixture
