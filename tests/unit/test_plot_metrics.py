"""tools/plot_metrics.py: a metrics JSONL (as the training loop writes it) becomes a PNG."""

import importlib.util
import json
import struct
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_tool(path: Path) -> types.ModuleType:
    """The standalone tool as a module, without putting tools/ on sys.path for the whole session."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_metrics = _load_tool(REPO / "tools" / "plot_metrics.py")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, iterations: int = 20, eval_every: int = 5) -> Path:
    """Records shaped like MetricsWriter's: train each iteration, valid and throughput at intervals."""
    with open(path, "w") as fh:
        for it in range(1, iterations + 1):
            acc = min(1.0, 0.5 + it / (2 * iterations))
            train = {
                "split": "train",
                "iteration": it,
                "loss": 0.7 - 0.02 * it,
                "rewards/chosen": -1.0 + 0.1 * it,
                "rewards/rejected": -1.5,
                "rewards/accuracies": acc,
                "rewards/margins": 0.5 + 0.1 * it,
                "logps/chosen": -1.2,
                "logps/rejected": -2.5,
                "num_pairs": 8,
                "lr": 1e-3,
                "grad_norm": 0.5,
                "skipped": False,
                "consumed_samples": 8 * it,
            }
            fh.write(json.dumps(train) + "\n")
            if it % eval_every == 0:
                fh.write(
                    json.dumps(
                        {
                            "split": "throughput",
                            "iteration": it,
                            "tokens_per_s": 1000.0,
                            "pairs_per_s": 10.0,
                            "ms_per_iter": 50.0,
                            "skipped_iters": 0,
                        }
                    )
                    + "\n"
                )
                fh.write(
                    json.dumps(
                        {
                            "split": "valid",
                            "iteration": it,
                            "loss": 0.72 - 0.015 * it,
                            "rewards/accuracies": acc - 0.05,
                            "rewards/margins": 0.4 + 0.08 * it,
                            "num_pairs": 32,
                        }
                    )
                    + "\n"
                )
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_main_writes_a_png(tmp_path, capsys):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "metrics.png"
    assert plot_metrics.main(["--metrics", str(metrics), "--output", str(out)]) == 0
    width, height = png_size(out)
    assert width > 500 and height > 200
    # matplotlib reads it back as an image
    import matplotlib.image

    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (height, width)
    assert image.std() > 0  # something is drawn
    # 20 train + 4 valid points on each of the 3 panels
    assert "72 points" in capsys.readouterr().out


def test_read_metrics_splits_and_last_record_wins(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", iterations=10, eval_every=5)
    with open(path, "a") as fh:  # a resumed run writes iteration 10 again
        fh.write(json.dumps({"split": "train", "iteration": 10, "loss": 0.123}) + "\n")
        fh.write('{"split": "train", "iteration": 11, "lo')  # cut short by a kill
    by_split = plot_metrics.read_metrics(str(path))
    assert set(by_split) == {"train", "valid", "throughput"}
    assert sorted(by_split["valid"]) == [5, 10]
    xs, ys = plot_metrics.series(by_split["train"], "loss")
    assert xs == list(range(1, 11))
    assert ys[-1] == 0.123


def test_series_skips_missing_and_non_finite_values():
    records = {1: {"loss": 1.0}, 2: {"loss": float("nan")}, 3: {}, 4: {"loss": None}, 5: {"loss": 0.5}}
    assert plot_metrics.series(records, "loss") == ([1, 5], [1.0, 0.5])


def test_train_only_metrics_still_plot(tmp_path):
    path = tmp_path / "train_only.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "split": "train",
                    "iteration": i,
                    "loss": 1.0 / i,
                    "rewards/accuracies": 0.5,
                    "rewards/margins": 0.1 * i,
                }
            )
            + "\n"
            for i in range(1, 6)
        )
    )
    out = tmp_path / "p.png"
    assert plot_metrics.main(["--metrics", str(path), "--output", str(out)]) == 0
    png_size(out)


def test_metrics_without_plottable_records_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"split": "throughput", "iteration": 1, "tokens_per_s": 1.0}) + "\n")
    out = tmp_path / "p.png"
    assert plot_metrics.main(["--metrics", str(path), "--output", str(out)]) == 2
    assert "no train or valid records" in capsys.readouterr().err
    assert not out.exists()


def test_missing_metrics_file_is_an_error(tmp_path, capsys):
    assert plot_metrics.main(["--metrics", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "p.png")]) == 2
    assert "cannot read --metrics" in capsys.readouterr().err


def test_command_line(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "cli.png"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), "--metrics", str(metrics), "--output", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    png_size(out)
