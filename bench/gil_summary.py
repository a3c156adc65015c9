"""Summarise py-spy's collapsed stacks (`py-spy record --gil --threads -f raw`): where the GIL was held.

    python bench/gil_summary.py gil.txt [--top 30]

Prints the share of GIL samples per thread, the innermost frames that held it (library code included), and for
each sample the innermost frame of this project's own code (wdsembed/, flows/, tasks/), which names the caller that
led to library time: "DALI's feed_input" comes out under the pipeline function that called it.
"""
from __future__ import annotations

import argparse
import collections
import re

OURS = re.compile(r"\((?:.*/)?(?:wdsembed|flows|tasks|bench)/[^:]*:\d+\)|\((?:worker|pipeline|shards|tarstream|shard|"
                  r"threads|output|storage|validate|fidelity|imagesize|preprocess|model|embed|report|caching|plan)\.py:\d+\)")


def frame_name(frame: str) -> str:
    """'func (path/file.py:123)' without its line number."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    threads: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    per_thread_ours: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    with open(args.path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            # "thread (0x..): name" or "thread (tid): name" leads the stack with --threads
            thread = re.sub(r"^thread \([^)]*\):?\s*", "", frames[0]) if frames[0].startswith("thread") else "?"
            thread = re.sub(r"\d+", "N", thread) or "(unnamed)"
            body = frames[1:] if frames[0].startswith("thread") else frames
            total += n
            threads[thread] += n
            leaves[frame_name(body[-1]) if body else "?"] += n
            mine = next((frame_name(fr) for fr in reversed(body) if OURS.search(fr)), "(not our code)")
            ours[mine] += n
            per_thread_ours[thread][mine] += n
    print(f"GIL samples: {total}")
    print("\n# by thread")
    for name, n in threads.most_common():
        print(f"{n / total:7.1%}  {name}")
    print(f"\n# innermost frame (top {args.top})")
    for name, n in leaves.most_common(args.top):
        print(f"{n / total:7.1%}  {name}")
    print(f"\n# innermost frame of this project's code (top {args.top})")
    for name, n in ours.most_common(args.top):
        print(f"{n / total:7.1%}  {name}")
    print("\n# per thread, innermost frame of this project's code (top 8)")
    for thread, _ in threads.most_common(12):
        print(f"## {thread}")
        for name, n in per_thread_ours[thread].most_common(8):
            print(f"  {n / total:7.1%}  {name}")


if __name__ == "__main__":
    main()
