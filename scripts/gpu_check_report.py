"""Collects the results of scripts/gpu_check.sh into OUTDIR/gpu-check.json and the table OUTDIR/gpu-check.md.

    python scripts/gpu_check_report.py OUTDIR --gpu NAME --arch X.Y --seconds S

Reads OUTDIR/steps.tsv (name, status, exit code, seconds, command), the benchmarks' JSON files
(OUTDIR/bench-*.json) and the step logs (the last lines of each, and the benchmarks' printed tables).
"""
import argparse
import glob
import json
import os
import platform
import subprocess


def read_steps(out):
    steps = []
    with open(os.path.join(out, "steps.tsv")) as f:
        for line in f:
            name, status, rc, seconds, command = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
            log = os.path.join(out, "logs", name + ".log")
            tail = []
            if os.path.exists(log):
                with open(log, errors="replace") as lf:
                    tail = lf.read().splitlines()[-15:]
            steps.append({"step": name, "status": status, "exit_code": None if rc == "-" else int(rc),
                          "seconds": float(seconds or 0), "command": command, "log_tail": tail})
    return steps


def environment(gpu, arch):
    env = {"gpu": gpu, "compute_capability": arch, "python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except Exception as exc:  # the report must be written even when torch is broken
        env["torch"] = f"not importable: {exc}"
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except Exception:
        env["nvidia_smi"] = None
    try:
        env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                     timeout=20).stdout.strip().splitlines()[-1]
    except Exception:
        env["nvcc"] = None
    return env


def bench_tables(out, steps):
    """The printed tables of the benchmark steps (their logs, which hold little else)."""
    tables = []
    for s in steps:
        if s["step"].startswith("bench-"):
            log = os.path.join(out, "logs", s["step"] + ".log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    tables.append((s["step"], f.read().rstrip()))
    return tables


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--gpu", default="?")
    parser.add_argument("--arch", default="?")
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args()
    steps = read_steps(args.out)
    benches = {}
    for path in sorted(glob.glob(os.path.join(args.out, "bench-*.json"))):
        with open(path) as f:
            try:
                benches[os.path.basename(path)[:-5]] = json.load(f)
            except json.JSONDecodeError as exc:
                benches[os.path.basename(path)[:-5]] = {"error": f"unreadable JSON: {exc}"}
    ok = all(s["status"] == "passed" for s in steps) and bool(steps)
    report = {"ok": ok, "seconds": args.seconds, "environment": environment(args.gpu, args.arch), "steps": steps,
              "benchmarks": benches}
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    lines = [f"# gpu-check on {args.gpu} (sm {args.arch}): {'all steps passed' if ok else 'SOME STEPS DID NOT PASS'}"
             f" in {args.seconds:.0f} s", "", "| step | status | exit | seconds | last line of its log |",
             "|---|---|---|---|---|"]
    for s in steps:
        last = next((line for line in reversed(s["log_tail"]) if line.strip()), s["command"] if s["status"] == "skipped" else "")
        lines.append(f"| {s['step']} | {s['status']} | {'' if s['exit_code'] is None else s['exit_code']} | "
                     f"{s['seconds']:.1f} | {last.replace('|', '/')[:150]} |")
    for name, text in bench_tables(args.out, steps):
        lines += ["", f"## {name}", "", "```", text, "```"]
    with open(os.path.join(args.out, "gpu-check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(steps) + 4]))


if __name__ == "__main__":
    main()
