"""Run the fellrec command and SIGKILL it at the N-th call of one function, as a power cut would.

    DIE_IN=fellrec/trainer.py:AdapterTrainer.test DIE_AT_CALL=1 python tests/killer.py run ...

The function is found by its source file's ending and its qualified name, through a profile hook
that watches calls: nothing in the program is replaced, so the code that runs is the real one.
"""

import os
import signal
import sys


def arm(where: str, nth: int) -> None:
    filename, _, qualname = where.partition(":")
    calls = 0

    def watch(frame, event, _arg):
        nonlocal calls
        code = frame.f_code
        if event == "call" and code.co_qualname == qualname and code.co_filename.endswith(filename):
            calls += 1
            if calls == nth:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit

    sys.setprofile(watch)


if __name__ == "__main__":
    arm(os.environ["DIE_IN"], int(os.environ.get("DIE_AT_CALL", "1")))
    from fellrec.cli import main

    sys.exit(main(sys.argv[1:]))
