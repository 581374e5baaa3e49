"""tools/gpu_check.py (``make gpu-check``) on a machine without a GPU, and its report reading."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_why_and_exits_0(capsys, tmp_path):
    # The suite hides every GPU (tests/conftest.py), so this is the CPU machine's path.
    assert _tool().main(["--out", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu-check skipped: no CUDA GPU visible (torch.cuda.is_available() is False)")
    assert not (tmp_path / "reports").exists()  # nothing ran


def test_reads_outcomes_figures_and_skip_reasons_from_junit(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        """<testsuites><testsuite>
        <testcase classname="t" name="test_a" time="1.5"><properties>
          <property name="figure" value="logps 1.0e-03 (&lt;= 1.2e-02)"/></properties></testcase>
        <testcase classname="t" name="test_b" time="0.1"><properties><property name="figure" value="x"/>
          </properties><failure message="AssertionError: over the bound&#10;details">tb</failure></testcase>
        <testcase classname="t" name="test_c" time="0"><skipped message="needs 2 GPUs; 1 visible"/></testcase>
        </testsuite></testsuites>"""
    )
    cases = _tool().junit_cases(str(xml))
    assert [(c["name"], c["outcome"], c["detail"]) for c in cases] == [
        ("test_a", "pass", "logps 1.0e-03 (<= 1.2e-02)"),
        ("test_b", "FAIL", "AssertionError: over the bound"),
        ("test_c", "skip", "needs 2 GPUs; 1 visible"),
    ]
    assert cases[0]["time_s"] == 1.5
