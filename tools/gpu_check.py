"""``make gpu-check``: the GPU tests and the MFU benchmark, summed up on one screen.

Runs ``pytest tests/gpu`` (JUnit XML report; each test records its figure) and then
``tools/bench/bench_mfu.py``, and prints one line per case (pass / fail / skip, with its figure
or skip reason) and the benchmark's tokens/s and MFU. Reports go to ``--out`` (default: a new
temporary directory). Exit status: 0 when nothing failed (skips included), 1 when a test or
the benchmark failed. Without a CUDA GPU it runs nothing, says why and exits 0.

    python tools/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Guards against a hang (8 minutes in all on one GPU; the two-GPU groups get 3 more minutes).
TESTS_TIMEOUT_S = 300
TWO_GPU_EXTRA_S = 180
BENCH_TIMEOUT_S = 180


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def junit_cases(path: str) -> list[dict]:
    """Each test case of a JUnit XML report: name, outcome, figure (or skip/failure message), time."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "pass", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skip" if tag == "skipped" else "FAIL"
                detail = (node.get("message") or "").splitlines()[0] if node.get("message") else tag
        figures = [p.get("value") for p in case.iter("property") if p.get("name") == "figure"]
        if outcome == "pass" and figures:
            detail = figures[0]
        cases.append(
            {"name": case.get("name"), "outcome": outcome, "detail": detail, "time_s": float(case.get("time", 0))}
        )
    return cases


def _run(cmd: list[str], timeout: float, log: str) -> tuple[int, str]:
    """Run ``cmd`` with its output in ``log``; past ``timeout`` its whole process group (the
    processes it spawned on the GPUs too) is killed and the code is 124."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    return code, open(log).read()


def run_tests(out: str, gpus: int) -> tuple[list[dict], float]:
    xml = os.path.join(out, "gpu_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", "-rs"]
    cmd += [f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    start = time.monotonic()
    timeout = TESTS_TIMEOUT_S + (TWO_GPU_EXTRA_S if gpus >= 2 else 0)
    code, text = _run(cmd, timeout, os.path.join(out, "gpu_tests.log"))
    seconds = time.monotonic() - start
    if not os.path.exists(xml):
        why = "timed out" if code == 124 else f"exited {code}"
        return [{"name": "pytest tests/gpu", "outcome": "FAIL", "detail": why, "time_s": seconds}], seconds
    return junit_cases(xml), seconds


def run_bench(out: str) -> dict:
    start = time.monotonic()
    code, text = _run([sys.executable, "tools/bench/bench_mfu.py"], BENCH_TIMEOUT_S, os.path.join(out, "bench_mfu.log"))
    lines = [line for line in text.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if code == 0 and lines else {"error": f"exited {code} (see bench_mfu.log)"}
    result["time_s"] = round(time.monotonic() - start, 1)
    return result


def bench_line(bench: dict) -> tuple[str, str]:
    if "error" in bench:
        return "FAIL", bench["error"]
    if "skipped" in bench:
        return "skip", bench["skipped"]
    mfu = f"{100 * bench['mfu']:.1f}%" if bench.get("mfu") is not None else "n/a (unknown GPU peak)"
    return "pass", (
        f"{bench['real_tokens_per_s']:.0f} tokens/s, MFU {mfu} ({bench['model_tflops_per_s']} TFLOP/s, "
        f"{bench['transformer_impl']}, {bench['step_s']} s/step)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the reports go (default: a new temporary directory)")
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"gpu-check skipped: {reason}; the GPU tests and the MFU benchmark need a CUDA GPU.", flush=True)
        return 0
    import torch

    out = args.out or tempfile.mkdtemp(prefix="simpo-gpu-check-")
    os.makedirs(out, exist_ok=True)
    cases, test_s = run_tests(out, torch.cuda.device_count())
    bench = run_bench(out)
    outcome, detail = bench_line(bench)
    rows = [(c["name"], c["outcome"], c["detail"]) for c in cases] + [("bench_mfu", outcome, detail)]
    width = max(len(r[0]) for r in rows)
    print(f"gpu-check on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
    for name, result, text in rows:
        print(f"  {name:<{width}}  {result:<4}  {text[:140]}")
    failed = sum(r[1] == "FAIL" for r in rows)
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("pass", "FAIL", "skip")}
    print(
        f"tests {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped in {test_s:.0f} s; "
        f"bench {bench['time_s']} s; reports in {out}"
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"cases": cases, "bench": bench}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
