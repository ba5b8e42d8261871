"""`python -m tests.audited_gunicorn ARGS` runs gunicorn's command line (as `python -m gunicorn
ARGS` does) with an arbiter that writes each fork and each `time.sleep` it makes to the file named
by $VRYPT_TEST_EVENTS, one word a line. tests/test_arbiter.py reads from it whether the missing
workers are forked at once: gunicorn's own spawn_workers sleeps 0-0.1 s after every fork. Only
the arbiter writes; the workers run as usual."""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    path = os.environ["VRYPT_TEST_EVENTS"]
    arbiter = os.getpid()
    sleep = time.sleep

    def note(event: str) -> None:
        if os.getpid() == arbiter:
            with open(path, "a") as out:
                out.write(event + "\n")

    def noted_sleep(seconds: float) -> None:
        note("sleep")
        sleep(seconds)

    def in_the_worker() -> None:
        time.sleep = sleep

    time.sleep = noted_sleep
    os.register_at_fork(before=lambda: note("fork"), after_in_child=in_the_worker)
    from gunicorn.app.wsgiapp import run

    sys.argv[0] = "gunicorn"
    run()


if __name__ == "__main__":
    main()
