"""The baseline for bench/describe_latency.py: a plain boto3 script making describe-environment's calls.

Usage: python bench/plain_describe.py ENDPOINT DEPLOYMENT ENVIRONMENT ASG LB TARGET_GROUP
"""

import sys

import boto3

endpoint, dep, env, asg_name, lb, tg = sys.argv[1:7]
kw = dict(
    endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
)
ec2 = boto3.client("ec2", **kw)
rows = []
for page in ec2.get_paginator("describe_instances").paginate(
    Filters=[
        {"Name": "tag:deployment", "Values": [dep]},
        {"Name": "tag:environment", "Values": [env]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
):
    for r in page["Reservations"]:
        for i in r["Instances"]:
            tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            rows.append(
                (
                    tags.get("role"),
                    i["InstanceId"],
                    i["InstanceType"],
                    i["State"]["Name"],
                    i.get("PrivateIpAddress"),
                )
            )
group = boto3.client("autoscaling", **kw).describe_auto_scaling_groups(
    AutoScalingGroupNames=[asg_name]
)
health = boto3.client("elb", **kw).describe_instance_health(LoadBalancerName=lb)
elbv2 = boto3.client("elbv2", **kw)
arn = elbv2.describe_target_groups(Names=[tg])["TargetGroups"][0]["TargetGroupArn"]
th = elbv2.describe_target_health(TargetGroupArn=arn)
for row in sorted(rows, key=lambda r: (r[0] or "", r[1])):
    print(*row)
print(
    len(group["AutoScalingGroups"]),
    len(health["InstanceStates"]),
    len(th["TargetHealthDescriptions"]),
)
