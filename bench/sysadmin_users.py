"""update-sysadmin-users vs ansible-playbook vs one host at a time, on 20 isolated test hosts.

The job: ensure N sysadmin users (account in admin+sudo, bash, GECOS, authorized_keys) on every
host. Each contender starts from fresh hosts (no users) at the same addresses, in the same run:

- **fabflows**: the update-sysadmin-users flow, ``max_concurrency=100%``, against a real Prefect
  server already running (as a worker would), inventory from moto. It does more than the job:
  reads every host first, re-reads it before changing it, rebuilds the deploy user's keys, checks
  its own login with a fresh connection, and reads every host again to verify.
- **ansible**: ``ansible-playbook`` (PyPI ``ansible``, in ``bench/.venv-ansible``), forks=20, with
  its fastest settings (pipelining, ControlPersist, no fact gathering): ``ansible.builtin.user`` +
  ``ansible.posix.authorized_key`` (exclusive) looped over the users.
- **serial**: the same flow with ``max_concurrency=1``: one host at a time, as the original did.

Targets: fabflows <= 0.8 x ansible and <= 0.2 x serial (wall time). A second, idempotent run of
fabflows and ansible is timed too. Before timing, one untimed dry run warms the Prefect server (flow
registration) and moto's autoscaling backend, so the first contender pays no cold start. Contender
order alternates between rounds; medians are reported. Results: bench/results/sysadmin_users.json.

Needs root (test hosts) and ``bench/.venv-ansible`` (``python3 -m venv bench/.venv-ansible &&
bench/.venv-ansible/bin/pip install ansible``). Uses the f3 test network (10.210.0.0/24) unless
FABFLOWS_TEST_NET_PREFIX / FABFLOWS_TEST_NET_SUBNET say otherwise.

Usage: .venv/bin/python bench/sysadmin_users.py [--hosts 20] [--users 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, prefect_server

PREFIX = os.environ.get("FABFLOWS_TEST_NET_PREFIX", "f3")
SUBNET = os.environ.get("FABFLOWS_TEST_NET_SUBNET", "10.210.0")
ANSIBLE_VENV = ROOT / "bench" / ".venv-ansible"

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  become: true
  tasks:
    - name: sysadmin accounts
      ansible.builtin.user:
        name: "{{ item.name }}"
        comment: "{{ item.gecos }}"
        groups: admin,sudo
        append: true
        shell: /bin/bash
        password: "*"
      loop: "{{ sysadmins }}"
    - name: their keys
      ansible.posix.authorized_key:
        user: "{{ item.name }}"
        key: "{{ item.key }}"
        exclusive: true
      loop: "{{ sysadmins }}"
"""


def ansible_files(work: Path, net, hosts, users: list[dict[str, str]]) -> tuple[Path, Path, Path]:
    inventory = work / "inventory.ini"
    lines = ["[all]"]
    lines += [f"{h.name} ansible_host={h.ip}" for h in hosts]
    lines += [
        "[all:vars]",
        "ansible_user=deploy",
        f"ansible_ssh_private_key_file={net.client_key}",
        "ansible_python_interpreter=/usr/bin/python3",
        "ansible_ssh_common_args='-o UserKnownHostsFile="
        f"{net.known_hosts} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes'",
    ]
    inventory.write_text("\n".join(lines) + "\n")
    playbook = work / "users.yml"
    playbook.write_text(PLAYBOOK)
    (work / "group_vars").mkdir(exist_ok=True)
    (work / "group_vars" / "all.json").write_text(json.dumps({"sysadmins": users}))
    cfg = work / "ansible.cfg"
    cfg.write_text(
        "[defaults]\nforks = 20\nhost_key_checking = True\nstdout_callback = default\n"
        "interpreter_python = /usr/bin/python3\n"
        "[ssh_connection]\npipelining = True\n"
        "ssh_args = -o ControlMaster=auto -o ControlPersist=60s\n"
        f"control_path_dir = {work}/cp\n"
    )
    return inventory, playbook, cfg


def run_ansible(work: Path, inventory: Path, playbook: Path, cfg: Path) -> float:
    env = {
        "PATH": f"{ANSIBLE_VENV}/bin:/usr/bin:/bin",
        "ANSIBLE_CONFIG": str(cfg),
        "ANSIBLE_HOME": str(work / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
        "HOME": str(work),
        "LANG": "C.UTF-8",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(ANSIBLE_VENV / "bin" / "ansible-playbook"), "-i", str(inventory), str(playbook)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"ansible-playbook failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        )
    subprocess.run(
        [str(ANSIBLE_VENV / "bin" / "ansible"), "all", "-i", str(inventory), "-m", "meta",
         "-a", "reset_connection"],
        env=env, cwd=work, capture_output=True,
    )  # fmt: skip
    return elapsed


def check_hosts(hosts, users: list[dict[str, str]]) -> None:
    """Every user exists, in sudo, with exactly its key (the job was really done)."""
    for h in hosts:
        for u in users:
            groups = h.exec(["id", "-Gn", u["name"]]).stdout.split()
            assert "sudo" in groups and "admin" in groups, (h.name, u["name"], groups)
            keys = h.exec(["cat", f"/home/{u['name']}/.ssh/authorized_keys"]).stdout
            assert keys.split()[:2] == u["key"].split()[:2], (h.name, u["name"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only", choices=("fabflows", "ansible", "serial"), help="run one contender (no ratios)"
    )
    args = parser.parse_args()
    if not (ANSIBLE_VENV / "bin" / "ansible-playbook").exists():
        print(f"missing {ANSIBLE_VENV}: python3 -m venv {ANSIBLE_VENV} && "
              f"{ANSIBLE_VENV}/bin/pip install ansible", file=sys.stderr)  # fmt: skip
        return 2

    with prefect_server() as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return bench(args, api_url)


def bench(args: argparse.Namespace, api_url: str) -> int:
    from prefect.logging import disable_run_logger

    from config import load_config
    from fabflows.runbook import load_context
    from fabflows.testing.configs import moto_section, write_config
    from fabflows.testing.moto_server import MotoServer
    from fabflows.testing.sshkeys import ed25519_pair, write_users_dir
    from flows.update_sysadmin_users import update_sysadmin_users
    from sandbox.aws_seed import seed
    from sandbox.testhosts import HostSpec, TestNetwork
    from tasks.aws.autoscaling import describe_auto_scaling_group
    from tasks.aws.ec2 import describe_servers

    work = Path(tempfile.mkdtemp(prefix="bench-users-"))
    moto = MotoServer().start()
    net = TestNetwork(work / "net", prefix=PREFIX, subnet=SUBNET, images=("base",))
    net.setup()
    try:
        section = moto_section(moto.endpoint)
        section["ssh"] = {
            "identity_file": str(net.client_key),
            "known_hosts_file": str(net.known_hosts),
            "address_attribute": "private_ip_address",
            "connect_timeout": 5,
        }
        config = write_config(work, fabflows=section, deploy_user="deploy", home="/home/deploy")
        cfg = load_config(config)
        web = 4
        extra = max(0, (args.hosts - web) // 4 - 1)
        seed(
            moto.endpoint,
            cfg,
            ["staging"],
            f"{SUBNET}.0/24",
            (f"{SUBNET}.{n}" for n in itertools.count(100)),
            web_count=args.hosts - 4 * (extra + 1),
            extra_per_role=extra,
        )
        with disable_run_logger():
            creds = load_context("staging", config=str(config)).creds
            servers = describe_servers.fn(creds, "myproject", "staging")
            describe_auto_scaling_group.fn(creds, "myproject-staging-ag")  # warm moto's ASG backend
        specs = [HostSpec(f"b{i}", s.private_ip_address) for i, s in enumerate(servers)]
        pairs = [ed25519_pair(f"user{i}@bench") for i in range(args.users)]
        users = [
            {"name": f"sysadmin{i}", "key": p.public, "gecos": f"Sysadmin {i}"}
            for i, p in enumerate(pairs)
        ]
        users_dir = write_users_dir(
            work / "users",
            {u["name"]: p for u, p in zip(users, pairs, strict=True)},
            {u["name"]: u["gecos"] for u in users},
        )
        print(f"{len(specs)} hosts, {args.users} users, {args.rounds} round(s); Prefect {api_url}")

        def fresh_hosts():
            for name in list(net.hosts):
                net.destroy(name)
            return net.start(specs)

        def flow(concurrency: str) -> tuple[float, float]:
            started = time.perf_counter()
            state = update_sysadmin_users(
                environment="staging",
                config=str(config),
                users_dir=str(users_dir),
                dry_run=False,
                max_concurrency=concurrency,
                return_state=True,
            )
            elapsed = time.perf_counter() - started
            if not state.is_completed():
                raise RuntimeError(f"flow failed: {state.message}")
            report = state.result()
            return elapsed, sum(s.seconds or 0.0 for s in report.steps)  # the apply steps

        fresh_hosts()  # warm-up, not timed: the Prefect server registers the flow on its first run
        warm = update_sysadmin_users(
            environment="staging", config=str(config), users_dir=str(users_dir), return_state=True
        )
        if not warm.is_completed():
            raise RuntimeError(f"warm-up dry run failed: {warm.message}")

        times: dict[str, list[float]] = {
            k: []
            for k in (
                "fabflows",
                "fabflows_apply_step",
                "fabflows_again",
                "ansible",
                "ansible_again",
                "serial",
            )
        }
        for rnd in range(args.rounds):
            order = ("fabflows", "ansible", "serial") if rnd % 2 == 0 else (
                "serial", "ansible", "fabflows"
            )  # fmt: skip
            for contender in [c for c in order if args.only in (None, c)]:
                hosts = fresh_hosts()
                if contender == "fabflows":
                    wall, step = flow("100%")
                    times["fabflows"].append(wall)
                    times["fabflows_apply_step"].append(step)
                    check_hosts(hosts, users)
                    times["fabflows_again"].append(flow("100%")[0])
                elif contender == "serial":
                    times["serial"].append(flow("1")[0])
                    check_hosts(hosts, users)
                else:
                    files = ansible_files(work, net, hosts, users)
                    times["ansible"].append(run_ansible(work, *files))
                    check_hosts(hosts, users)
                    times["ansible_again"].append(run_ansible(work, *files))
                print(f"round {rnd + 1} {contender}: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in times.items() if k.startswith(contender) and v
                ))  # fmt: skip
        med = {k: statistics.median(v) for k, v in times.items() if v}
        if args.only:
            print(json.dumps({k: round(v, 2) for k, v in med.items()}, indent=2))
            return 0
        result = {
            "hosts": len(specs),
            "users": args.users,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "seconds": times,
            "median_seconds": med,
            "ratio_vs_ansible": med["fabflows"] / med["ansible"],
            "ratio_vs_serial": med["fabflows"] / med["serial"],
            "targets": {"vs_ansible": 0.8, "vs_serial": 0.2},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sysadmin_users.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: round(v, 2) for k, v in med.items()}, indent=2))
        print(
            f"fabflows / ansible = {result['ratio_vs_ansible']:.2f} (target <= 0.8); "
            f"fabflows / serial = {result['ratio_vs_serial']:.2f} (target <= 0.2)"
        )
        return 0
    finally:
        net.teardown()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
