"""The test lab's moto server: followers of EC2 states describe only after a change."""

from __future__ import annotations

import boto3

from fabflows.testing.moto_server import ChangeWatch, MotoServer


def _ec2(aws: MotoServer):  # noqa: ANN202
    return boto3.client(
        "ec2",
        endpoint_url=aws.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_a_watch_is_due_after_a_write_and_not_after_reads(aws: MotoServer) -> None:
    ec2 = _ec2(aws)
    watch = ChangeWatch(aws.endpoint, fallback=3600)
    assert watch.due()  # the first look always describes
    assert not watch.due()
    ec2.describe_instances()
    ec2.describe_images()
    assert not watch.due()  # reads change nothing
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    (inst,) = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"]
    assert watch.due()
    assert not watch.due()
    ec2.stop_instances(InstanceIds=[inst["InstanceId"]])
    assert watch.due()
    aws.reset()  # moto's own API (a reset) is a change too
    assert watch.due()


def test_a_watch_falls_back_to_looking_every_so_often(aws: MotoServer) -> None:
    watch = ChangeWatch(aws.endpoint, fallback=0.0)
    assert watch.due() and watch.due()  # no change, but the fallback has passed


def test_a_server_of_another_process_is_always_due() -> None:
    watch = ChangeWatch("http://127.0.0.1:9", fallback=3600)
    assert watch.due() and watch.due()
