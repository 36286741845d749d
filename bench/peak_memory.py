"""Run a module as ``python -m`` does and print its own peak resident memory on stderr's last line.

    python -m bench.peak_memory memory_service export --include-embeddings > out.jsonl

The parent's ``wait4`` / ``getrusage`` peak is no use for this: Linux counts the memory of the process that forked
the child (a test runner, a benchmark holding its corpus) into the child's ``ru_maxrss``. ``VmHWM`` in
``/proc/self/status`` belongs to the address space the module runs in, so it is the module's peak alone.
"""

from __future__ import annotations

import runpy
import sys

PREFIX = "peak_rss_kb="


def peak_kb() -> int:
    """This process's high-water resident memory since its exec, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def read_peak(stderr: str) -> int:
    """The peak a run under this module printed last on stderr, in KiB."""
    return int(stderr.rstrip().rsplit("\n", 1)[-1].removeprefix(PREFIX))


def main() -> None:
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stdout.flush()
        print(f"{PREFIX}{peak_kb()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
