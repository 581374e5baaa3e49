"""simpo_megatron.fsutil: outputs appear whole or not at all."""

import os

import pytest

from simpo_megatron.fsutil import atomic_write_text, publish, staged, temporary_path


def test_staged_file_appears_only_on_success(tmp_path):
    out = tmp_path / "out.txt"
    with staged(str(out)) as tmp:
        with open(tmp, "w") as fh:
            fh.write("done")
        assert not out.exists()
    assert out.read_text() == "done"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_staged_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with staged(str(out)) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("writer died")
    assert out.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_staged_directory(tmp_path):
    out = tmp_path / "ckpt"
    with staged(str(out)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "a.bin"), "wb") as fh:
            fh.write(b"x" * 10)
    assert (out / "sub" / "a.bin").read_bytes() == b"x" * 10
    assert os.listdir(tmp_path) == ["ckpt"]


def test_publish_replaces_a_file_and_temporary_names_are_per_process(tmp_path):
    out = tmp_path / "tracker.txt"
    atomic_write_text(str(out), "1")
    atomic_write_text(str(out), "2")
    assert out.read_text() == "2" and os.listdir(tmp_path) == ["tracker.txt"]
    tmp = temporary_path(str(out))
    assert tmp.startswith(str(out) + ".tmp-") and tmp.endswith(f"-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write("3")
    publish(tmp, str(out))
    assert out.read_text() == "3"
