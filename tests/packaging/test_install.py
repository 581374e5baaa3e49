"""The package as a user installs it: a fresh virtual environment, CPU torch as the Makefile
installs it, then ``pip install .`` with no extras (``make setup``, which the suite itself runs
under, is the editable install). The data tool runs as the console command and as
``tools/preprocess_preference_data.py`` on the example's SentencePiece model with a chat
template (given as Jinja text), and its output, read back with megatron-core's IndexedDataset,
is the output of the tool run in this process; the other console commands are installed, and
answer ``--help``. The install must not import the checkout's source tree (whose C++ builder
is not built in place).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from simpo_megatron.data import preprocess

REPO = Path(__file__).resolve().parents[2]
TORCH_SPEC = os.environ.get("TORCH_SPEC") or "torch==2.13.0"  # the Makefile's default
SP_MODEL = REPO / "examples" / "data" / "tokenizer.model"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Sort ascending: 42 7 19"}],
        "chosen": [{"role": "assistant", "content": " 7 19 42"}],
        "rejected": [{"role": "assistant", "content": " 42 19 7"}],
    },
    {
        "prompt": "Reverse the words: apple river stone",
        "chosen": " stone river apple",
        "rejected": " apple river stone",
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Largest of: 3 88 12"},
        ],
        "chosen": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Largest of: 3 88 12"},
            {"role": "assistant", "content": " 88"},
        ],
        "rejected": " 3",
    },
]


def _env() -> dict[str, str]:
    """This environment without what would make the venv's Python import this checkout or
    another environment's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(*command, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in command], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _copy_checkout(dest: Path) -> Path:
    """The files a fresh clone of this working tree has (tracked, and new ones not ignored): no
    build outputs, no compiled extension."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _pairs(prefix: Path) -> list[tuple[list[int], ...]]:
    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(0, len(ds) + 1, 3))
    return [tuple(ds[i + j].tolist() for j in range(3)) for i in range(0, len(ds), 3)]


def test_install_without_extras_runs_the_data_tool(tmp_path, capsys):
    if shutil.which("git") is None:
        pytest.skip("needs git to list the checkout's files")
    src = _copy_checkout(tmp_path / "src")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    flags = [
        "--input",
        data,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        SP_MODEL,
        "--chat-template",
        TEMPLATE,
    ]
    assert preprocess.main([str(f) for f in flags] + ["--output-prefix", str(tmp_path / "reference")]) == 0
    capsys.readouterr()
    expected = _pairs(tmp_path / "reference")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))
    assert len(expected) == len(PAIRS)
    assert all(p[0][0] == sp.bos_id() and p[1][-1] == p[2][-1] == sp.eos_id() for p in expected)
    assert sp.decode(expected[0][1]).strip() == "7 19 42"

    venv = tmp_path / "venv"
    started = time.perf_counter()
    _run(sys.executable, "-m", "venv", venv)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _run(python, "-m", "pip", "install", "-q", TORCH_SPEC)
    _run(python, "-m", "pip", "install", "-q", src)
    where = _run(python, "-c", "import simpo_megatron; print(simpo_megatron.__file__)", cwd=tmp_path).strip()
    assert Path(where).is_relative_to(venv), where
    for name, command in (
        ("entry", [bin_dir / "simpo-preprocess"]),
        ("tool", [python, src / "tools" / "preprocess_preference_data.py"]),
    ):
        prefix = tmp_path / name
        summary = _run(*command, *flags, "--output-prefix", prefix, cwd=tmp_path)
        assert f"wrote {len(PAIRS)} pairs" in summary
        assert _pairs(prefix) == expected, name
    for entry in ("simpo-train", "simpo-convert", "simpo-score-reference", "simpo-estimate-memory"):
        assert (bin_dir / entry).is_file(), entry
    # Their imports resolve without extras (10 s each, so the two that reach every module).
    for entry in ("simpo-train", "simpo-estimate-memory"):
        assert "usage:" in _run(bin_dir / entry, "--help", cwd=tmp_path), entry
    print(f"fresh venv, torch, the install and runs: {time.perf_counter() - started:.0f} s")
