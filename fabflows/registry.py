"""Every runbook the CLI and the deployments know: kebab-case flow name -> "module:function"."""

import importlib
from typing import Any

FLOWS: dict[str, str] = {
    "describe-environment": "flows.describe_environment:describe_environment",
    "update-sysadmin-users": "flows.update_sysadmin_users:update_sysadmin_users",
    "fix-static-cors": "flows.fix_static_cors:fix_static_cors",
    "refresh-sdists": "flows.refresh_sdists:refresh_sdists",
    "begin-upgrade": "flows.begin_upgrade:begin_upgrade",
    "end-upgrade": "flows.end_upgrade:end_upgrade",
    "upgrade-status": "flows.upgrade_status:upgrade_status",
    "upgrade-packages": "flows.upgrade_packages:upgrade_packages",
    "pull-server-secrets": "flows.pull_server_secrets:pull_server_secrets",
    "stop-environment": "flows.stop_environment:stop_environment",
    "start-environment": "flows.start_environment:start_environment",
    "reload-production-db": "flows.reload_production_db:reload_production_db",
    "recover-environment": "flows.recover_environment:recover_environment",
    "resume-run": "flows.resume_run:resume_run",
    "restart-app": "flows.restart_app:restart_app",
    "resize-environment": "flows.resize_environment:resize_environment",
    "push-server-secrets": "flows.push_server_secrets:push_server_secrets",
    "rotate-credentials": "flows.rotate_credentials:rotate_credentials",
    "deploy-serial": "flows.deploy_serial:deploy_serial",
    "update-newrelic-keys": "flows.update_newrelic_keys:update_newrelic_keys",
    "promote-replica": "flows.promote_replica:promote_replica",
    "reset-replicas": "flows.reset_replicas:reset_replicas",
    "add-replica": "flows.add_replica:add_replica",
    "add-server": "flows.add_server:add_server",
    "watchdog": "flows.watchdog:watchdog",
}


def load(name: str) -> Any:
    """The flow registered as ``name``, imported when first asked for: a runbook that starts
    another (the watchdog's recoveries) goes through here, never by importing that flow."""
    module, _, attr = FLOWS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
