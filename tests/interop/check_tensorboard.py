#!/usr/bin/env python3
"""Reads a qforge TensorBoard event file with TensorBoard's own EventAccumulator (the real peer of
core/tensorboard.cpp) and prints its scalars as JSON: {tag: [{"step", "value", "wall_time"}, ...]}.

Usage: check_tensorboard.py EVENT_FILE
Exit status: 0 when at least one scalar was read, 1 when none were, 2 on bad usage / missing file.
Needs the `tensorboard` package (pip install tensorboard); TensorFlow is not required.
"""
import json
import os
import sys


def main(argv):
    if len(argv) != 2:
        print(f"usage: {os.path.basename(argv[0])} EVENT_FILE", file=sys.stderr)
        return 2
    path = argv[1]
    if not os.path.isfile(path):
        print(f"check_tensorboard: no such event file: {path}", file=sys.stderr)
        return 2
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as e:
        print(f"check_tensorboard: the tensorboard package is required ({e})", file=sys.stderr)
        return 2

    # size_guidance 0 = keep every scalar (the default reservoir-samples down to 10000).
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in sorted(acc.Tags().get(event_accumulator.SCALARS, [])):
        out[tag] = [{"step": int(e.step), "value": float(e.value), "wall_time": float(e.wall_time)}
                    for e in acc.Scalars(tag)]
    print(json.dumps(out, indent=2, sort_keys=True))
    if not any(out.values()):
        print(f"check_tensorboard: no scalars found in {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
