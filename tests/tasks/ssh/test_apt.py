"""apt: parsers table-tested on real apt output; gather and apply against a real local repository."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.logging import disable_run_logger

from fabflows.testing.apt_repo import AptRepo
from fabflows.testing.upgrade_lab import install_image_packages, serve_test_repo
from sandbox.provision import point_apt_at
from tasks.ssh.apt import (
    AptFacts,
    AptOutcome,
    PackageVersion,
    apply_apt_plan,
    check_package_names,
    expected_reboots,
    failed_packages,
    gather_apt_facts,
    parse_audit,
    parse_dpkg_query,
    parse_kept_back,
    parse_reboot,
    parse_simulation,
)
from tasks.ssh.connection import ConnectionPool, SshOptions
from tasks.ssh.fleet import FleetHost, RateControl

SIMULATION = """\
NOTE: This is only a simulation!
      apt-get needs root privileges for real execution.
Reading package lists...
Building dependency tree...
Calculating upgrade...
The following packages have been kept back:
  linux-image-amd64 linux-headers-amd64
The following packages will be upgraded:
  fabflows-demo libc6
2 upgraded, 0 newly installed, 0 to remove and 2 not upgraded.
Inst libc6 [2.36-9+deb12u7] (2.36-9+deb12u8 Debian:12.8/stable [amd64]) []
Inst fabflows-demo [1.0] (2.0 fabflows-test:stable [all])
Inst fabflows-app-lib (1.0 fabflows-test:stable [all])
Conf libc6 (2.36-9+deb12u8 Debian:12.8/stable [amd64])
Conf fabflows-demo (2.0 fabflows-test:stable [all])
"""


def test_parse_simulation_and_kept_back() -> None:
    assert parse_simulation(SIMULATION) == [
        PackageVersion(
            name="libc6",
            current="2.36-9+deb12u7",
            new="2.36-9+deb12u8",
            origin="Debian:12.8/stable [amd64]",
        ),
        PackageVersion(
            name="fabflows-demo", current="1.0", new="2.0", origin="fabflows-test:stable [all]"
        ),
        PackageVersion(
            name="fabflows-app-lib", current=None, new="1.0", origin="fabflows-test:stable [all]"
        ),
    ]
    assert parse_kept_back(SIMULATION) == ["linux-headers-amd64", "linux-image-amd64"]
    assert (
        parse_simulation("0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n") == []
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\tii \t1.0\nb\tiF \t2.0\nc\tun \t\n", {"a": "1.0", "b": None, "c": None}),
        ("libc6:amd64\tii \t2.36\n", {"libc6": "2.36"}),
        ("", {}),
    ],
)
def test_parse_dpkg_query(text, expected) -> None:
    assert parse_dpkg_query(text) == expected


def test_reboot_audit_and_dpkg_errors() -> None:
    assert parse_reboot("") == (False, [])
    assert parse_reboot("required\nlinux-image-6.1\nlibc6\nlibc6\n") == (
        True,
        ["libc6", "linux-image-6.1"],
    )
    audit = (
        "The following packages are only half configured, probably due to problems\n"
        "configuring them the first time.\n fabflows-broken      fabflows test package\n"
    )
    assert parse_audit(audit) == ["fabflows-broken"]
    assert failed_packages(
        "dpkg: error processing package x (--configure):\nErrors were encountered while processing:\n x\n y\nE: Sub-process"
    ) == ["x", "y"]


@pytest.mark.parametrize(
    ("names", "patterns", "expected"),
    [
        (["linux-image-6.1.0-28-amd64", "curl"], ["linux-image-*"], ["linux-image-6.1.0-28-amd64"]),
        (["libc6", "libc6-dev"], ["libc6"], ["libc6"]),
        (["curl"], ["linux-image-*", "libc6"], []),
    ],
)
def test_expected_reboots(names, patterns, expected) -> None:
    changes = [PackageVersion(name=n, current="1", new="2") for n in names]
    assert expected_reboots(changes, patterns) == expected


@pytest.mark.parametrize("bad", ["; rm -rf /", "Foo", "a b", "-oops", "x=1.0"])
def test_package_names_are_refused_before_any_command(bad) -> None:
    with pytest.raises(ValueError, match="not Debian package names"):
        check_package_names(["curl", bad], "app_server_packages")


# --------------------------------------------------------------------------- real apt


@pytest.fixture(scope="module")
def repo(test_network, tmp_path_factory) -> Iterator[AptRepo]:
    r = serve_test_repo(tmp_path_factory.mktemp("apt-repo"), test_network)
    yield r
    r.stop()


@pytest.mark.hosts
def test_gather_apply_verify_with_a_real_repository(make_hosts, test_network, repo) -> None:
    db, web, broken = make_hosts(["ap1", "ap2", "ap3"])
    for h in (db, web, broken):
        point_apt_at(h, repo.url)
        install_image_packages(h, repo)
    broken.exec(["touch", "/etc/fabflows-break"])
    # fabflows-app-lib was installed automatically on the web server: it must stay "auto"
    fleet = [
        FleetHost(name="ap1", address=db.ip, role="db-primary"),
        FleetHost(name="ap2", address=web.ip, role="web"),
        FleetHost(name="ap3", address=broken.ip, role="worker"),
    ]
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=3,
    )
    app = {"web": ["fabflows-app-tools"], "worker": ["fabflows-app-tools"]}
    with disable_run_logger(), ConnectionPool(opts) as pool:
        gathered = gather_apt_facts.fn(fleet, pool, app)
        facts = {r.host: r.output for r in gathered.results}
        assert all(isinstance(f, AptFacts) for f in facts.values())
        assert {p.name: (p.current, p.new) for p in facts["ap1"].upgrades} == {
            "fabflows-broken": ("1.0", "2.0"),
            "fabflows-demo": ("1.0", "2.0"),
            "fabflows-reboot": ("1.0", "2.0"),
            "fabflows-slow": ("1.0", "2.0"),
        }
        assert facts["ap1"].app_packages_missing == []  # db servers get no app packages
        assert facts["ap2"].app_packages_missing == ["fabflows-app-tools"]
        assert {p.name for p in facts["ap2"].installs} == {"fabflows-app-tools", "fabflows-app-lib"}
        assert not facts["ap1"].reboot_required

        changes = {
            r.address: list(
                {
                    p.name: p.model_copy(update={"mark_auto": p.name == "fabflows-app-lib"})
                    for p in r.output.upgrades + r.output.installs
                }.values()
            )
            for r in gathered.results
        }
        dry = apply_apt_plan.fn(fleet, pool, changes, RateControl(max_concurrency=1), dry_run=True)
        assert [r.label for r in dry.results] == ["would change"] * 3
        assert "fabflows-demo=2.0" in dry.results[0].commands[0]
        assert "--force-confold" in dry.results[0].commands[0]
        assert db.exec(["cat", "/usr/share/fabflows-test/fabflows-demo.version"]).stdout == "1.0\n"

        applied = apply_apt_plan.fn(
            fleet, pool, changes, RateControl(max_concurrency=1, max_errors=1), dry_run=False
        )
        by_host = {r.host: r for r in applied.results}
        assert by_host["ap1"].status == "changed"
        assert "REBOOT REQUIRED (fabflows-reboot)" in by_host["ap1"].message
        ap1: AptOutcome = by_host["ap1"].output
        assert ap1.not_as_planned == [] and ap1.still_pending == [] and ap1.audit == ""
        assert by_host["ap2"].status == "changed"
        auto = web.exec(["apt-mark", "showauto"]).stdout.split()
        assert "fabflows-app-lib" in auto and "fabflows-app-tools" not in auto
        assert by_host["ap3"].status == "failed"
        assert "fabflows-broken could not be configured" in by_host["ap3"].message
        assert by_host["ap3"].output.failed_packages == ["fabflows-broken"]
        assert db.exec(["cat", "/usr/share/fabflows-test/fabflows-demo.version"]).stdout == "2.0\n"
        assert db.exec(["test", "-e", "/var/run/reboot-required"], check=False).returncode == 0

        again = gather_apt_facts.fn(fleet[:2], pool, app)
        assert [r.output.upgrades for r in again.results] == [[], []]
        assert [r.output.reboot_required for r in again.results] == [True, True]
        nothing = apply_apt_plan.fn(fleet[:2], pool, {}, RateControl(), dry_run=False)
        assert [r.status for r in nothing.results] == ["unchanged"] * 2


@pytest.mark.hosts
def test_update_failure_is_retried_then_reported(make_hosts, test_network, repo) -> None:
    [h] = make_hosts(["ap9"])
    point_apt_at(h, "http://" + test_network.bridge_ip + ":9/")  # nothing listens there
    opts = SshOptions(
        user="deploy",
        known_hosts_file=str(test_network.known_hosts),
        key_file=str(test_network.client_key),
        connect_timeout=3,
    )
    with disable_run_logger(), ConnectionPool(opts) as pool:
        result = gather_apt_facts.fn(
            [FleetHost(name="ap9", address=h.ip, role="web")],
            pool,
            {},
            update_attempts=2,
            retry_delay=0.1,
        )
    [r] = result.results
    assert r.status == "failed" and "apt-get" in r.message and "update" in r.message
    assert "failed 2 time(s)" in r.message
