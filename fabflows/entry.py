"""The ``fabflows`` console script: hand ``run``/``flows`` to the warm runner if one is up.

Kept tiny on purpose (stdlib only): with a warm runner the whole call costs a fork instead of
Prefect's imports. Anything else, or no warm runner, goes to the full CLI in this process.
"""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] in (["run"], ["flows"]):
        from fabflows.warm import try_run

        code = try_run(argv)
        if code is not None:
            return code
    if argv[:1] == ["warm"]:
        from fabflows.warm import main as warm_main

        return warm_main(argv[1:])
    from fabflows.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
