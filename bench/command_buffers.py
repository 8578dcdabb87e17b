"""Do XLA's command buffers (CUDA graphs) replay, or are they re-recorded every execution?

  python3 bench/command_buffers.py -- python3 bench/host_bound.py --variants base --steps 48

Runs the command with XLA's command-buffer thunk logging (TF_CPP_VMODULE=command_buffer_thunk=3)
and prints one JSON line counting, over the whole run: command-buffer executions, updates (a
re-recording of the graph because a buffer it uses moved, e.g. a fresh input or output
allocation), their host time, and the commands per graph. Many updates per execution mean the
graphs save no launch time: the host records the commands again instead of launching them.
Note that XLA runs command buffers as plain thunks while a profiler is tracing, so a kernel
profile shows per-kernel launches either way. The command's own JSON lines are passed through.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

_UPDATED = re.compile(r"Updated command buffer in (\d+) .s; num_commands=(\d+)")
_INITIALIZED = re.compile(
    r"Initialized command buffer on device #\d+ in (\d+) .s; num_commands=(\d+)"
)


def summarize(lines) -> dict:
    executions = updates = initializations = 0
    update_us = init_us = 0
    commands: dict[int, int] = {}
    for line in lines:
        if "Execute command buffer on device" in line:
            executions += 1
        elif m := _UPDATED.search(line):
            updates += 1
            update_us += int(m.group(1))
            commands[int(m.group(2))] = commands.get(int(m.group(2)), 0) + 1
        elif m := _INITIALIZED.search(line):
            initializations += 1
            init_us += int(m.group(1))
    return {
        "executions": executions,
        "updates": updates,
        "update_ms_total": update_us / 1000,
        "initializations": initializations,
        "init_ms_total": init_us / 1000,
        "updated_graph_sizes": dict(sorted(commands.items())),
    }


def main():
    command = sys.argv[1:]
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise SystemExit("give the command to run after --")
    env = dict(os.environ, TF_CPP_VMODULE="command_buffer_thunk=3", TF_CPP_MIN_LOG_LEVEL="0")
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("{"):
            print(line[:600])
    print(json.dumps({"rc": proc.returncode, **summarize(err.splitlines())}))


if __name__ == "__main__":
    main()
