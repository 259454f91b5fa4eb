"""Checks over HTTP: what users and load balancers see during maintenance."""
