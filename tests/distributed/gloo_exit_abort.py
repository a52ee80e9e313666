"""A minimal reproduction, without this package, of the gloo abort at exit seen in the distributed tests.

    python tests/distributed/gloo_exit_abort.py --ending exit --runs 40

launches `--runs` times two processes that join a gloo process group, all-reduce one tensor and end in one of four
ways, and counts the runs in which a process aborted with "terminate called without an active exception":

- `exit`: return without `destroy_process_group()`;
- `destroy`: `destroy_process_group()`, with nothing else holding the group, so that it is freed there and then;
- `destroy-held`: `destroy_process_group()` while another reference to the group lives on (as the DDP wrapper,
  DeepSpeed's engines and `import torch._dynamo` each keep one in the distributed tests' processes);
- `barrier-held`: as `destroy-held`, after a barrier (`hf_mtkd.distributed.process_group_scope` and the distributed
  tests' worker end so), during which a waiting process lets the worker threads have the GIL.

The all-reduced tensor is kept to the end, as a model's parameters are.

The cause is a race in torch's gloo backend: a worker thread (`pt_gloo_runloop`) drops its reference to a finished
collective, and with it the last C++ reference to a Python tensor, only after the waiting thread has been woken.
Dropping it needs the GIL; if the main thread has meanwhile reached interpreter finalization, taking the GIL ends the
worker thread with `pthread_exit`, whose unwinding through the work's `noexcept` destructor calls `std::terminate`.
`destroy_process_group()` avoids it only when it frees the group, whose destructor joins the worker threads first.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

ABORT = "terminate called without an active exception"
ENDINGS = ("exit", "destroy", "destroy-held", "barrier-held")
HELD = []  # kept to interpreter finalization: the tensor, and for `*-held` the group


def rank_main(ending: str, switch_interval: float | None) -> None:
    """One process: the collective and the chosen ending (the launcher sets MASTER_ADDR, RANK, ...)."""
    import torch
    import torch.distributed as dist

    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)

    dist.init_process_group("gloo")
    if ending.endswith("-held"):
        HELD.append(dist.group.WORLD)
    HELD.append(torch.ones(1000))
    dist.all_reduce(HELD[-1])
    if ending == "barrier-held":
        dist.barrier()
    if ending != "exit":
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(ending: str, switch_interval: float | None) -> bool:
    """Launch the two processes once; whether one of them aborted."""
    port = str(free_port())
    interval = [] if switch_interval is None else ["--switch-interval", str(switch_interval)]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--ending", ending, "--rank", str(rank), *interval],
            env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    return any(ABORT in output for output in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ending", choices=ENDINGS, default="exit", help="How each process ends (see above).")
    parser.add_argument("--runs", type=int, default=40, help="How many two-process runs to launch.")
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval in each process (Python's default: 0.005 s): how long a thread waits for the GIL "
        "before it asks the holder to give it up; longer widens the race's window.",
    )
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set in the launched processes
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.ending, args.switch_interval)
        return
    aborted = sum(run_once(args.ending, args.switch_interval) for _ in range(args.runs))
    interval = "" if args.switch_interval is None else f", switch interval {args.switch_interval} s"
    print(f"{args.ending}{interval}: {aborted} of {args.runs} runs aborted ({ABORT!r})")


if __name__ == "__main__":
    main()
