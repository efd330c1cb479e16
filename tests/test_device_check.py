import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_prints_the_plan_without_a_gpu():
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for part in ("tests on CUDA", "bf16 SFT/PRM/DPO steps", "chainstep run (default)", "model.size=small"):
        assert part in done.stdout
