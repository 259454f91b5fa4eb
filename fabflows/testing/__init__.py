"""Test support shared by the test suite and the sandbox (real peers: moto server, test hosts)."""
