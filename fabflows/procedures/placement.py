"""Where a new server goes (its availability zone, subnet and Name, as FabulAWS's ``fab new`` chose
them; pure) and the step that launches it. Shared by the runbooks that launch a server
(add-replica, add-server).

- Zones are the environment's ``avail_zones`` (FabulAWS lists letters: ``e`` is ``us-east-1e``),
  else every zone of the region; a zone asked for must exist in the region and be one of those.
- Without a zone asked for, the one with the fewest servers of the kind that matters (database
  servers for a replica, servers of the role otherwise) wins; ties go to the first listed.
- In a VPC the new server needs a subnet in its zone: the config's ``subnets`` entry for the zone,
  else the source server's own subnet when it is in that zone, else the VPC's first there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from config import EnvironmentConfig
from fabflows.runtime.engine import Scope
from tasks.aws.ec2 import Server
from tasks.aws.ec2_writes import terminate_instances, wait_for_instances
from tasks.aws.launch import LaunchSource, find_launched, launch_instance


class Placement(NamedTuple):
    zone: str | None
    subnet: str | None
    problems: list[str]
    spread: str  # servers per zone, as the plan shows it ("us-east-1a 2, us-east-1b 0")


def zone_name(zone: str, region: str) -> str:
    """``e`` -> ``us-east-1e`` (FabulAWS's avail_zones are letters); full names unchanged."""
    return f"{region}{zone}" if re.fullmatch(r"[a-z]", zone) else zone


def next_name(env: EnvironmentConfig, role: str, taken: Sequence[str]) -> str:
    """``<deployment>_<environment>_<role>``, numbered from 2 when that is taken."""
    base = f"{env.deployment}_{env.environment}_{role}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def configured_placement(extra: Mapping[str, Any], region: str) -> tuple[list[str], dict[str, str]]:
    """(avail_zones, zone -> subnet) from a FabulAWS config's top level, as full zone names."""
    zones = [zone_name(str(z), region) for z in extra.get("avail_zones") or []]
    subnets = extra.get("subnets") or {}
    by_zone = {
        zone_name(str(z), region): str(v)
        for z, v in (subnets.items() if isinstance(subnets, dict) else [])
        if isinstance(v, str)
    }
    return zones, by_zone


def choose_zone(
    *,
    wanted: str | None,
    env: EnvironmentConfig,
    region_zones: Sequence[str],
    configured_zones: Sequence[str],
    configured_subnets: Mapping[str, str],
    vpc_subnets: Mapping[str, Sequence[str]],
    source: LaunchSource | None,
    servers_by_zone: Mapping[str, str],
) -> Placement:
    """The zone and subnet for a new server, or the problems that stop it.

    ``servers_by_zone`` maps each server that counts (name -> its zone) for the fewest-first rule.
    """
    problems: list[str] = []
    zones = list(configured_zones or region_zones)
    where = "avail_zones" if configured_zones else f"the zones of {env.region}"
    vpc = source.vpc_id if source else None

    def subnet_of(zone: str) -> str | None:
        if zone in configured_subnets:
            return configured_subnets[zone]
        ids = list(vpc_subnets.get(zone, []))
        if source and source.subnet_id in ids:
            return source.subnet_id
        return ids[0] if ids else None

    counts = {z: sum(1 for v in servers_by_zone.values() if v == z) for z in zones}
    spread = ", ".join(f"{z} {counts.get(z, 0)}" for z in zones if z in region_zones)
    chosen: str | None = None
    if wanted:
        full = zone_name(wanted, env.region)
        if full not in region_zones:
            problems.append(
                f"availability zone {full!r} does not exist in {env.region} "
                f"(its zones: {', '.join(region_zones) or 'none listed'})"
            )
        elif full not in zones:
            problems.append(
                f"availability zone {full!r} is not one of {env.label}'s zones "
                f"({where}: {', '.join(zones)})"
            )
        elif vpc and subnet_of(full) is None:
            problems.append(f"no subnet of {vpc} in {full}")
        else:
            chosen = full
    else:
        for bad in [z for z in configured_zones if z not in region_zones]:
            problems.append(f"avail_zones names {bad!r}, which does not exist in {env.region}")
        usable = [z for z in zones if z in region_zones and (not vpc or subnet_of(z))]
        if usable:
            chosen = min(usable, key=lambda z: (counts.get(z, 0), zones.index(z)))
        elif not problems:
            problems.append(f"no usable availability zone ({where}: {', '.join(zones)})")
    subnet = subnet_of(chosen) if chosen and (vpc or chosen in configured_subnets) else None
    return Placement(chosen, subnet, problems, spread)


# --------------------------------------------------------------------------- the launch step


class LaunchPlan(Protocol):
    """What a runbook's plan says about the server it launches."""

    name: str
    image_id: str
    instance_type: str
    subnet_id: str | None
    availability_zone: str
    security_group_ids: list[str]


def launched_by_run(scope: Scope, record_tag: str) -> list[Server]:
    """Instances this run launched (tagged ``record_tag=<run id>``), whatever their state."""
    return find_launched(scope.rc.creds, record_tag, scope.run_id)


def launch_or_find(
    scope: Scope, plan: LaunchPlan, *, role_tag: str, record_tag: str, timeout: float
) -> tuple[Server, str]:
    """Launch the plan's server (or find the one this run launched before it was stopped: a
    resumed run never launches twice), wait until it runs; (the server, what was done)."""
    scope.record(run=scope.run_id, name=plan.name)
    creds, env = scope.rc.creds, scope.env
    found = launched_by_run(scope, record_tag)
    if found:
        iid = found[0].instance_id
        summary = f"{plan.name} ({iid}) was launched before"
    else:
        result = launch_instance(
            creds,
            image_id=plan.image_id,
            instance_type=plan.instance_type,
            subnet_id=plan.subnet_id,
            availability_zone=plan.availability_zone,
            security_group_ids=plan.security_group_ids,
            tags={
                "Name": plan.name,
                "deployment": env.deployment,
                "environment": env.environment,
                "role": role_tag,
                record_tag: scope.run_id,
            },
            dry_run=False,
        )
        assert result.instance_id is not None
        iid, summary = result.instance_id, result.summary
    scope.record(instance_id=iid)
    (server,) = wait_for_instances(creds, [iid], "running", timeout=timeout, poll=1.0)
    return server, summary


def terminate_launched(
    scope: Scope, name: str, record_tag: str, data: dict | None = None
) -> dict[str, str]:
    """The launch step's undo: terminate what this run launched, found by its tag (even if the
    run died before the journal had the id) and by the id the journal has."""
    ids = {s.instance_id for s in launched_by_run(scope, record_tag)}
    iid = (data or {}).get("instance_id")
    if isinstance(iid, str) and iid.startswith("i-"):
        ids.add(iid)
    if not ids:
        return {"summary": f"no instance of {name} to terminate"}
    return {"summary": terminate_instances(scope.rc.creds, sorted(ids), dry_run=False).summary}
