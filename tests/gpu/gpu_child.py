"""GPU tests: each case runs in a child process that sees the GPUs the suite hides (tests/conftest.py).

``probe()`` asks a child what it has (CUDA, compute capability, GPU count, Transformer Engine)
once; tests skip with its answer as the reason. ``case(group, name)`` runs ``cases.py GROUP``
on the GPUs once (every case of the group in one child) and returns case ``name``'s findings,
failing with the child's traceback where the case raised.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("cases.py")
ROOT = Path(__file__).resolve().parents[2]


def gpu_env() -> dict[str, str]:
    env = dict(os.environ)
    visible = env.get("SIMPO_TEST_VISIBLE_GPUS", "all")
    if visible == "all":
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON result in the child's output:\n{stdout[-3000:]}")


@functools.cache
def probe() -> dict:
    """What the GPU child sees: {"cuda", "capability": [major, minor], "gpus", "te": None | error}."""
    proc = subprocess.run(
        [sys.executable, str(CASES), "probe"], env=gpu_env(), capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        return {"cuda": False, "error": proc.stderr[-500:]}
    return _last_json(proc.stdout)


def skip_reason(te: bool = False, fp8: bool = False, gpus: int = 1) -> str | None:
    info = probe()
    if not info["cuda"]:
        return "needs a CUDA GPU: torch.cuda.is_available() is False" + (
            f" ({info['error']})" if info.get("error") else ""
        )
    if te and info["te"] is not None:
        return f"needs Transformer Engine: importing transformer_engine.pytorch failed ({info['te']})"
    major, minor = info["capability"]
    if fp8 and (major, minor) < (8, 9):
        return f"FP8 needs compute capability 8.9 or newer; this GPU is {major}.{minor}"
    if info["gpus"] < gpus:
        return f"needs {gpus} GPUs; {info['gpus']} visible"
    return None


@functools.cache
def run_case(group: str, timeout: float = 480) -> dict:
    """``cases.py GROUP``'s findings, once per session; a child that fails or hangs reports
    ``{"all": {"error": ...}}`` (so the group's tests fail fast, each with the reason)."""
    try:
        proc = subprocess.run(
            [sys.executable, str(CASES), group],
            env=gpu_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"all": {"error": f"cases.py {group} did not finish in {timeout} s"}}
    if proc.returncode != 0:
        return {
            "all": {
                "error": f"cases.py {group} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            }
        }
    return _last_json(proc.stdout)


def case(group: str, name: str) -> dict:
    """Case ``name`` of ``group``'s findings (a group-wide error stands for each of its cases)."""
    results = run_case(group)
    result = results.get(name, results.get("all"))
    assert result is not None, f"{group} reported no case {name!r}: {sorted(results)}"
    assert "error" not in result, f"case {name} raised:\n{result['error']}"
    return result
