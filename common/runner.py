"""compare.py's engine: runs each backend's work in a child process and writes the reports."""
from __future__ import annotations


def run(args) -> int:
    print(f"compare.py {args.report}: not implemented yet (see the compare.py issue)")
    return 2
