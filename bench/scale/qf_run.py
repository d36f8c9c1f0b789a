#!/usr/bin/env python3
"""The qforge side of bench/scale.sh: run one `qforge train` and measure it from outside.

    qf_run.py --metrics RUN/metrics.jsonl --out RESULT.json [--log LOG] -- QFORGE train CONFIG k=v ...

Memory (the process' own high-water mark, /proc/PID/status VmHWM, polled every --poll s, and
ru_maxrss from wait4 when it exits, which is what GNU time reports):
  load_peak_rss_mib     VmHWM when qforge logs "data: N train / M val sequences ..." (the line after
                        the model is built, quantized and wrapped, before the first step): load peak;
  step_peak_rss_mib     VmHWM when the last step's metrics line appears (before the final checkpoint
                        write that `qforge train` always does);
  process_peak_rss_mib  ru_maxrss of the whole process (includes that checkpoint write).
Time: each step's metrics line (trainer.log_every=1) is timestamped when it appears (as
bench/step_clock.py does); step k's time = t(k) - t(k-1), step 1's from the "data:" line;
step_s_median = the median over steps 2..N. Also the 1-min load average at start and end, the
process' user+sys CPU, the polled peak of RssAnon (VmHWM and ru_maxrss also count the resident pages
of the memory-mapped checkpoint), its exit code, and the last lines of its log on failure.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=None)
    ap.add_argument("--poll", type=float, default=0.005)
    ap.add_argument("--kill-above-mib", type=float, default=0, help="SIGKILL the process when its RssAnon passes this")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    if os.path.exists(a.metrics):
        os.remove(a.metrics)
    load0 = os.getloadavg()[0]
    t_start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hwm = {"v": 0}
    marks = {}
    log_lines = []
    lock = threading.Lock()

    def read_log():
        buf = b""
        logf = open(a.log, "wb") if a.log else None
        while True:
            chunk = p.stdout.read1(65536) if hasattr(p.stdout, "read1") else p.stdout.read(4096)
            if not chunk:
                break
            if logf:
                logf.write(chunk)
                logf.flush()
            buf += chunk
            while True:
                m = re.search(rb"[\r\n]", buf)
                if not m:
                    break
                line, buf = buf[: m.start()].decode("utf-8", "replace"), buf[m.end():]
                if not line.strip():
                    continue
                h = status_kb(p.pid, "VmHWM")
                with lock:
                    if h:
                        hwm["v"] = max(hwm["v"], h)
                    now = time.monotonic() - t_start
                    if "sequences of" in line and " val sequences" in line and "data_line" not in marks:
                        marks["data_line"] = (now, hwm["v"])
                    if "loaded Hugging Face checkpoint" in line and "loaded_line" not in marks:
                        marks["loaded_line"] = (now, hwm["v"])
                    if not line.startswith(("train ", "load ")):
                        log_lines.append(line)
                        del log_lines[:-40]
        if logf:
            logf.close()

    th = threading.Thread(target=read_log, daemon=True)
    th.start()
    steps = {}
    off = 0
    buf = b""
    ru = None
    killed = None
    anon_peak = 0
    while True:
        rss = status_kb(p.pid, "RssAnon")  # VmRSS also counts the mapped checkpoint's (reclaimable) pages
        anon_peak = max(anon_peak, rss or 0)
        if a.kill_above_mib > 0 and rss and rss / 1024 > a.kill_above_mib and killed is None:
            killed = rss / 1024
            p.kill()
        h = status_kb(p.pid, "VmHWM")
        with lock:
            if h:
                hwm["v"] = max(hwm["v"], h)
            cur_hwm = hwm["v"]
        try:
            with open(a.metrics, "rb") as f:
                f.seek(off)
                new = f.read()
        except OSError:
            new = b""
        if new:
            off += len(new)
            buf += new
            now = time.monotonic() - t_start
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if "step" in j and "loss" in j and j["step"] not in steps:
                    steps[j["step"]] = (now, cur_hwm, j["loss"])
        r = os.wait4(p.pid, os.WNOHANG)
        if r[0] == p.pid:
            ru = r[2]
            rc = os.waitstatus_to_exitcode(r[1])
            break
        time.sleep(a.poll)
    wall = time.monotonic() - t_start
    th.join(timeout=10)
    ks = sorted(steps)
    t_prev = marks.get("data_line", (None,))[0]
    step_s = []
    for k in ks:
        if t_prev is not None:
            step_s.append(steps[k][0] - t_prev)
        t_prev = steps[k][0]
    after = sorted(step_s[1:])
    med = None
    if after:
        n = len(after)
        med = after[n // 2] if n % 2 else 0.5 * (after[n // 2 - 1] + after[n // 2])
    out = {
        "rc": rc,
        "killed_over_cap": killed is not None,
        "rss_mib_at_kill": killed,
        "command": cmd,
        "wall_s": wall,
        "load_peak_rss_mib": marks["data_line"][1] / 1024 if "data_line" in marks else None,
        "load_s": marks["data_line"][0] if "data_line" in marks else None,
        "step_peak_rss_mib": steps[ks[-1]][1] / 1024 if ks else None,
        "process_peak_rss_mib": ru.ru_maxrss / 1024 if ru else None,
        "peak_rss_anon_mib": anon_peak / 1024,
        "step_hwm_mib": {k: steps[k][1] / 1024 for k in ks},
        "steps": len(ks),
        "step_s": [round(x, 4) for x in step_s],
        "step_s_median": med,
        "losses": [steps[k][2] for k in ks],
        "cpu_s": (ru.ru_utime + ru.ru_stime) if ru else None,
        "loadavg_1m": [load0, os.getloadavg()[0]],
    }
    if rc != 0:
        out["log_tail"] = log_lines[-20:]
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k not in ("command", "step_hwm_mib", "log_tail")}))
    sys.exit(rc)


if __name__ == "__main__":
    main()
