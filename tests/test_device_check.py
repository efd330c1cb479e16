import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_prints_the_plan_without_a_gpu():
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for part in ("tests on CUDA", "bf16 SFT/PRM/DPO steps", "chainstep run (default)", "configs/gpu.yaml"):
        assert part in done.stdout


def test_the_carried_wheels_cover_what_the_gpu_image_lacks(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--check-wheels"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    carried = (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines()
    for name in ("pydantic", "trl", "transformers"):  # absent from the image, or there at another version
        short = tmp_path / f"without-{name}.txt"
        short.write_text("\n".join(line for line in carried if not line.startswith(f"{name}==")))
        script = str(ROOT / "bench" / "device_wheels.py")
        done = subprocess.run([sys.executable, script, "check", "--manifest", str(short)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and f"{name}==" in done.stdout and "does not carry it" in done.stdout
