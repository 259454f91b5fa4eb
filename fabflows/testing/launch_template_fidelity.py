"""Closer-to-AWS CreateLaunchTemplateVersion in moto (5.2): ``SourceVersion`` inheritance.

On AWS a version created with ``SourceVersion`` starts from that version's data, and the
``LaunchTemplateData`` given overrides it (top-level keys replaced). moto ignores ``SourceVersion``:
the new version holds only the data given. A resize (new version with another ``InstanceType``)
followed by deploy-serial (new version with another ``ImageId``) then loses the instance type, and
the first version loses its image.

:func:`apply` patches moto's response handler in this process (where the test moto server runs) to
merge as AWS does. Idempotent; changes nothing else. Test support only, never used by runbooks.
(Kin of ``fabflows/testing/moto_fidelity.py``, which covers Standby and version deletion.)
"""

from __future__ import annotations

import copy
import threading
from typing import Any

_applied = False
_lock = threading.Lock()


def apply() -> None:
    global _applied
    with _lock:
        if _applied:
            return
        from moto.core.responses import ActionResult
        from moto.ec2.responses.launch_templates import LaunchTemplates

        def create_launch_template_version(self: Any) -> Any:
            name = self._get_param("LaunchTemplateName")
            tmpl_id = self._get_param("LaunchTemplateId")
            template = (
                self.ec2_backend.get_launch_template(tmpl_id)
                if tmpl_id
                else self.ec2_backend.get_launch_template_by_name(name)
            )
            description = self._get_param("VersionDescription")
            data = self._get_param("LaunchTemplateData", {})
            source = self._get_param("SourceVersion")
            if source:
                data = {**copy.deepcopy(template.get_version(source).data), **data}
            self.error_on_dryrun()
            version = template.create_version(data, description)
            return ActionResult(
                {
                    "LaunchTemplateVersion": {
                        "CreateTime": version.create_time,
                        "CreatedBy": f"arn:{self.partition}:iam::{self.current_account}:root",
                        "DefaultVersion": template.is_default(version),
                        "LaunchTemplateData": version.data,
                        "LaunchTemplateId": template.id,
                        "LaunchTemplateName": template.name,
                        "VersionDescription": version.description,
                        "VersionNumber": version.number,
                    }
                }
            )

        LaunchTemplates.create_launch_template_version = create_launch_template_version
        _applied = True
