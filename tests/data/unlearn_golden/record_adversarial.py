"""Record the golden train_log.csv files of cb, cb_lat, lat: run once on base commit 405f6ab (before
presets), from that checkout's root: PYTHONPATH=$PWD python record_adversarial.py DEST. Float32 CPU, one
process; the same run as tests/data/unlearn_golden/record.py with --layer-id 1 (cb_lat: targets 1,2)."""
import shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")  # conftest.write_unlearn_data
from conftest import write_unlearn_data
from unlearn_lens.testing import save_tiny_model
from click.testing import CliRunner
from cli import group

tmp = Path(tempfile.mkdtemp())
model = str(save_tiny_model("gpt_neox", tmp / "m"))
data = str(write_unlearn_data(tmp / "d"))
dest = Path(sys.argv[1])
for method in ["cb", "cb_lat", "lat"]:
    out = tmp / method
    args = ["unlearn", "--model", model, "--data", data, "--outdir", str(out), "--method", method,
            "--steps", "3", "--batch-size", "2", "--max-length", "16", "--device", "cpu", "--no-progress",
            "--lr", "1e-3", "--eval-every", "1", "--layer-id", "1"]
    if method == "cb_lat":
        args += ["--target-layers", "1,2"]
    r = CliRunner().invoke(group, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    shutil.copy(out / "train_log.csv", dest / f"{method}_train_log.csv")
    print((out / "train_log.csv").read_text())
