#!/usr/bin/env python3
"""Run one training process under /usr/bin/time -v and timestamp its optimizer steps from outside.

    step_clock.py --metrics RUN/metrics.jsonl --out RESULT.json [--log LOG] -- CMD ARGS...

Both sides of bench/train_throughput.sh append one JSON line per step ({"step": k, "loss": ...}) to a
metrics file and flush it (qforge: trainer.log_every=1; the PyTorch reference: --metrics). This
watcher polls the file every --poll seconds and records when each step's line appears, so both
processes are timed by the same external clock without changing qforge. Also records the
process wall time, GNU time's peak RSS / user / sys, and the share of the machine's CPU time used
by *other* processes while it ran (a noise indicator on a shared machine).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)  # busy, total (all CPUs)


def parse_time_v(path):
    out = {}
    keys = {"Maximum resident set size (kbytes)": ("maxrss_kb", int), "User time (seconds)": ("user_s", float),
            "System time (seconds)": ("sys_s", float), "Exit status": ("exit_status", int)}
    try:
        for line in open(path):
            k, _, v = line.strip().rpartition(": ")
            if k in keys:
                name, conv = keys[k]
                out[name] = conv(v)
    except OSError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=os.devnull)
    ap.add_argument("--poll", type=float, default=0.004)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    if os.path.exists(a.metrics):
        os.remove(a.metrics)
    tv = a.out + ".time"
    hz = os.sysconf("SC_CLK_TCK")

    steps = {}
    buf = b""
    pos = 0

    def drain(now):
        nonlocal buf, pos
        try:
            with open(a.metrics, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        pos += len(chunk)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            try:
                j = json.loads(ln)
            except ValueError:
                continue
            if "loss" in j and "step" in j and j["step"] not in steps:
                steps[j["step"]] = now

    b0, tot0 = cpu_jiffies()
    with open(a.log, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tv] + cmd, stdout=log, stderr=subprocess.STDOUT)
        size = -1
        while p.poll() is None:
            time.sleep(a.poll)
            try:
                s = os.stat(a.metrics).st_size
            except OSError:
                continue
            if s != size:
                size = s
                drain(time.perf_counter() - t0)
        t1 = time.perf_counter() - t0
    drain(t1)
    b1, tot1 = cpu_jiffies()
    tv_info = parse_time_v(tv)
    own = tv_info.get("user_s", 0.0) + tv_info.get("sys_s", 0.0)
    total_s = (tot1 - tot0) / hz
    others = max(0.0, (b1 - b0) / hz - own) / total_s if total_s > 0 else None
    res = {"rc": p.returncode, "wall_s": t1, "step_t": {str(k): steps[k] for k in sorted(steps)},
           "others_cpu_share": others, **tv_info}
    with open(a.out, "w") as f:
        json.dump(res, f)
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
