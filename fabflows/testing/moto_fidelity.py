"""Closer-to-AWS behaviour of moto (5.2) where the rolling runbooks depend on it.

Two gaps matter for taking web servers out of service and putting them back:

1. **Standby.** On AWS, ``EnterStandby`` deregisters the instance from the group's classic load
   balancers and target groups, and ``ExitStandby`` registers it again. moto only flips the
   lifecycle state; the instance keeps getting "traffic" (InService), and every later change of
   the group registers its Standby instances in the target groups again.
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

        AutoScalingBackend.update_attached_target_groups = update_attached_target_groups
        AutoScalingBackend.enter_standby_instances = enter_standby_instances
        AutoScalingBackend.exit_standby_instances = exit_standby_instances
        ELBBackend.deregister_instances = deregister_instances
        _applied = True
