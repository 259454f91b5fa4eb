"""Closer-to-AWS behaviour of moto (5.2) where the rolling runbooks depend on it.

Two gaps matter for taking web servers out of service and putting them back:

1. **Standby.** On AWS, ``EnterStandby`` deregisters the instance from the group's classic load
   balancers and target groups, and ``ExitStandby`` registers it again. moto only flips the
   lifecycle state; the instance keeps getting "traffic" (InService), and every later change of
   the group registers its Standby instances in the target groups again.
4. **Health checks never run**: a classic ELB says InService for any running instance. With
   :func:`elb_health_checks` on (the whole-environment tests turn it on while their servers
   exist), ``DescribeInstanceHealth`` really requests the load balancer's health-check target at
   each instance's private address and applies its healthy/unhealthy thresholds, as an ELB does:
   a new instance is OutOfService until it has answered enough checks.
3. **Launch template versions cannot be deleted**: moto has no ``DeleteLaunchTemplateVersions``.
   Added here as AWS documents it: the default version cannot be deleted, deleted versions are
   no longer described or launched, numbers are never reused.
2. **Manual deregistration of a group's instance from a classic ELB.** On AWS an ELB has one list of
   instances; moto keeps the ones the group registered in a second list that
   ``DeregisterInstancesFromLoadBalancer`` does not touch, so the instance stays InService.

:func:`apply` patches moto's backends (in this process, where the test moto server runs) to do what
AWS does. It is idempotent and changes nothing else. The sandbox and the tests call it before using
moto; the patches live here, in test support, never in the runbooks.
"""

from __future__ import annotations

import threading

_applied = False
_lock = threading.Lock()


def apply() -> None:
    """Patch moto once per process (see the module docstring)."""
    global _applied
    with _lock:
        if _applied:
            return
        from moto.autoscaling.models import AutoScalingBackend
        from moto.elb.models import ELBBackend

        update_groups = AutoScalingBackend.update_attached_target_groups
        enter = AutoScalingBackend.enter_standby_instances
        leave = AutoScalingBackend.exit_standby_instances
        deregister = ELBBackend.deregister_instances

        def _targets(backend, group):  # noqa: ANN001, ANN202
            return list(group.target_group_arns or [])

        def enter_standby_instances(self, group_name, instance_ids, should_decrement):  # noqa: ANN001, ANN202
            activities = enter(self, group_name, instance_ids, should_decrement)
            group = self.autoscaling_groups[group_name]
            for name in group.load_balancer_names or []:
                try:
                    self.elb_backend.deregister_instances(name, instance_ids, from_autoscaling=True)
                    self.elb_backend.deregister_instances(name, instance_ids)
                except Exception:  # noqa: BLE001 - a deleted load balancer
                    pass
            for arn in _targets(self, group):
                try:
                    self.elbv2_backend.deregister_targets(arn, [{"Id": i} for i in instance_ids])
                except Exception:  # noqa: BLE001
                    pass
            return activities

        def exit_standby_instances(self, group_name, instance_ids):  # noqa: ANN001, ANN202
            activities = leave(self, group_name, instance_ids)
            self.update_attached_elbs(group_name)
            group = self.autoscaling_groups[group_name]
            for arn in _targets(self, group):
                try:
                    self.elbv2_backend.register_targets(arn, [{"Id": i} for i in instance_ids])
                except Exception:  # noqa: BLE001
                    pass
            return activities

        def deregister_instances(self, load_balancer_name, instance_ids, from_autoscaling=False):  # noqa: ANN001, ANN202
            balancer = deregister(self, load_balancer_name, instance_ids, from_autoscaling)
            if not from_autoscaling:
                ids = list(instance_ids)
                balancer.instance_autoscaling_ids = [
                    i for i in balancer.instance_autoscaling_ids if i not in ids
                ]
            return balancer

        def update_attached_target_groups(self, group_name):  # noqa: ANN001, ANN202
            # moto registers every instance of the group, Standby ones included; AWS does not
            update_groups(self, group_name)
            group = self.autoscaling_groups[group_name]
            standby = [
                {"Id": s.instance.id}
                for s in group.instance_states
                if s.lifecycle_state == "Standby"
            ]
            if standby:
                for arn in _targets(self, group):
                    try:
                        self.elbv2_backend.deregister_targets(arn, standby)
                    except Exception:  # noqa: BLE001
                        pass

        _patch_launch_template_versions()
        _patch_elb_health()
        AutoScalingBackend.update_attached_target_groups = update_attached_target_groups
        AutoScalingBackend.enter_standby_instances = enter_standby_instances
        AutoScalingBackend.exit_standby_instances = exit_standby_instances
        ELBBackend.deregister_instances = deregister_instances
        _applied = True


def _patch_launch_template_versions() -> None:
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import InvalidLaunchTemplateVersionNotFound
    from moto.ec2.models.launch_templates import LaunchTemplate, LaunchTemplateBackend
    from moto.ec2.responses.launch_templates import LaunchTemplates

    get_version = LaunchTemplate.get_version
    describe = LaunchTemplateBackend.describe_launch_template_versions

    def deleted(template) -> set[int]:  # noqa: ANN001
        if not hasattr(template, "fabflows_deleted"):
            template.fabflows_deleted = set()
        return template.fabflows_deleted

    def patched_get_version(self, num):  # noqa: ANN001, ANN202
        version = get_version(self, num)
        if version.number in deleted(self):
            raise InvalidLaunchTemplateVersionNotFound(template_id=self.id, version=num)
        return version

    def patched_describe(self, *args, **kwargs):  # noqa: ANN001, ANN202
        return [(t, v) for t, v in describe(self, *args, **kwargs) if v.number not in deleted(t)]

    def delete_launch_template_versions(self) -> ActionResult:  # noqa: ANN001
        name = self._get_param("LaunchTemplateName")
        template_id = self._get_param("LaunchTemplateId")
        versions = self._get_param("LaunchTemplateVersion", []) or self._get_param("Versions", [])
        self.error_on_dryrun()
        if name:
            template = self.ec2_backend.get_launch_template_by_name(name)
        else:
            template = self.ec2_backend.get_launch_template(template_id)
        ok, failed = [], []
        for raw in versions:
            entry = {"LaunchTemplateId": template.id, "LaunchTemplateName": template.name}
            number = int(raw)
            known = 1 <= number <= len(template.versions) and number not in deleted(template)
            if not known:
                failed.append(
                    {
                        **entry,
                        "VersionNumber": number,
                        "ResponseError": {
                            "Code": "launchTemplateVersionDoesNotExist",
                            "Message": "no such version",
                        },
                    }
                )
            elif number == template.default_version_number:
                failed.append(
                    {
                        **entry,
                        "VersionNumber": number,
                        "ResponseError": {
                            "Code": "launchTemplateVersionIsDefault",
                            "Message": "the default version cannot be deleted",
                        },
                    }
                )
            else:
                deleted(template).add(number)
                ok.append({**entry, "VersionNumber": number})
        return ActionResult(
            {
                "SuccessfullyDeletedLaunchTemplateVersions": ok,
                "UnsuccessfullyDeletedLaunchTemplateVersions": failed,
            }
        )

    LaunchTemplate.get_version = patched_get_version
    LaunchTemplateBackend.describe_launch_template_versions = patched_describe
    LaunchTemplates.delete_launch_template_versions = delete_launch_template_versions


_health_checks_on = False
_health: dict[
    tuple[str, str], list[int]
] = {}  # (lb, instance) -> [ok streak, fail streak, healthy]
_health_lock = threading.Lock()


def elb_health_checks(on: bool) -> None:
    """Turn the health checks of classic ELBs on or off (process-wide; history reset)."""
    global _health_checks_on
    apply()
    with _health_lock:
        _health_checks_on = on
        _health.clear()


def _check(address: str, target: str, timeout: float = 0.5) -> bool:
    """One ELB health check: ``HTTP:80/healthcheck.html`` -> GET it, 200 is healthy; ``TCP:22``."""
    import http.client
    import socket

    protocol, _, rest = target.partition(":")
    port_text, _, path = rest.partition("/")
    try:
        port = int(port_text)
        if protocol.upper() in ("HTTP", "HTTPS"):
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
            conn.request("GET", "/" + path)
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _patch_elb_health() -> None:
    from moto.ec2.models import ec2_backends
    from moto.elb.models import ELBBackend

    describe = ELBBackend.describe_instance_health

    def describe_instance_health(self, lb_name, instances):  # noqa: ANN001, ANN202
        out = describe(self, lb_name, instances)
        if not _health_checks_on:
            return out
        elb = self.get_load_balancer(lb_name)
        check = getattr(elb, "health_check", None)
        if check is None:
            return out
        ec2 = ec2_backends[self.account_id][self.region_name]
        for entry in out:
            if entry["State"] != "InService":
                continue
            try:
                address = ec2.get_instance(entry["InstanceId"]).private_ip
            except Exception:  # noqa: BLE001
                continue
            ok = _check(address, check.target)
            with _health_lock:
                streaks = _health.setdefault((lb_name, entry["InstanceId"]), [0, 0, 0])
                if ok:
                    streaks[0], streaks[1] = streaks[0] + 1, 0
                    if streaks[0] >= int(check.healthy_threshold):
                        streaks[2] = 1
                else:
                    streaks[0], streaks[1] = 0, streaks[1] + 1
                    if streaks[1] >= int(check.unhealthy_threshold):
                        streaks[2] = 0
                healthy = bool(streaks[2])
            if not healthy:
                entry["State"] = "OutOfService"
                entry["ReasonCode"] = "Instance"
                entry["Description"] = (
                    "Instance has failed at least the UnhealthyThreshold number of health checks "
                    "consecutively."
                )
        return out

    ELBBackend.describe_instance_health = describe_instance_health
