"""What the GPU machine lacks, as wheels, worked out rather than listed by hand.

The closure of chainstep's dependencies (every package its pins pull in, with markers read for
the GPU machine: CPython 3.12 on x86-64 Linux) is compared with the GPU image's own packages
(`bench/gpu_image.txt`); what the image lacks, or has at another version than this environment
resolved, must travel as wheels. torch is the image's own (its CUDA build; the CPU pin does not
apply there) and is not followed.

    python bench/device_wheels.py plan     # what must travel, and why
    python bench/device_wheels.py make     # write bench/gpu_wheels.txt, download cp312 wheels into wheels/
    python bench/device_wheels.py check    # fail when image + bench/gpu_wheels.txt miss part of the closure
    python bench/device_wheels.py verify   # on the device, after installing: every pin imports at its version
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

BENCH = Path(__file__).resolve().parent
IMAGE, MANIFEST = BENCH / "gpu_image.txt", BENCH / "gpu_wheels.txt"
IMAGE_OWN = {"torch"}  # the image's CUDA build; not carried, not followed
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "os_name": "posix"}
# newest first; llguidance needs glibc 2.31. The image's glibc was not read: its Python 3.12.3 is
# Ubuntu 24.04's, whose glibc is 2.39
PLATFORMS = ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "any")


def closure() -> dict[str, str]:
    """name -> the version this environment resolved, for every package chainstep needs on the
    GPU machine: its pins (read from pyproject.toml, so an install older than the pins cannot
    hide one) and what they pull in (extras left out, torch's own tree left to the image)."""
    found: dict[str, str] = {}
    todo: list[list[str]] = [_pins()]
    while todo:
        for text in todo.pop():
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({**TARGET, "extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in found:
                continue
            found[name] = metadata.version(req.name)
            if name not in IMAGE_OWN:
                todo.append(metadata.distribution(req.name).requires or [])
    return found


def _pins() -> list[str]:
    return tomllib.loads((BENCH.parent / "pyproject.toml").read_text())["project"]["dependencies"]


def read_list(path: Path) -> dict[str, str | None]:
    """`name` or `name==version` lines (comments after #) -> name -> version or None."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def needed(deps: dict[str, str], image: dict[str, str | None]) -> dict[str, str]:
    """What must travel: packages the image lacks, or has at a known other version."""
    return {name: version for name, version in sorted(deps.items()) if name not in IMAGE_OWN
            and (name not in image or image[name] not in (None, version))}


def problems(deps: dict[str, str], image: dict[str, str | None],
             carried: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(errors, notes): a needed package not carried, or a pin carried at another version, is an
    error; a package only pulled in (not pinned) that resolved to another version here is a note,
    since a fresh install may resolve a newer one than the wheels were made from."""
    pinned = {canonicalize_name(Requirement(r).name) for r in _pins()}
    errors, notes = [], []
    for name, version in sorted(needed(deps, image).items()):
        if name not in carried:
            where = f"the image has {image[name]}" if name in image else "the image lacks it"
            errors.append(f"{name}=={version}: {where} and {MANIFEST.name} does not carry it")
        elif carried[name] != version:
            line = f"{name}: {MANIFEST.name} carries {carried[name]}, this environment resolved {version}"
            (errors if name in pinned else notes).append(line)
    return errors, notes


def make(deps: dict[str, str], image: dict[str, str | None], wheels: Path) -> None:
    carry = needed(deps, image)
    header = ("# written by bench/device_wheels.py make: what the GPU image lacks or has at another\n"
              "# version; fetched as CPython 3.12 manylinux (or pure-Python) wheels into wheels/\n")
    MANIFEST.write_text(header + "".join(f"{n}=={v}\n" for n, v in carry.items()))
    wheels.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                    *(f"{n}=={v}" for n, v in carry.items())], check=True)
    files = list(wheels.glob("*.whl"))
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(carry)} packages, {len(files)} wheels, {size:.1f} MiB in {wheels}")


def verify(carried: dict[str, str | None]) -> list[str]:
    """On the device: every carried package is installed at its version."""
    out = []
    for name, version in carried.items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed (wanted {version})")
            continue
        if got != version:
            out.append(f"{name}: {got} installed, {version} wanted")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("plan", "make", "check", "verify"))
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="the carried list (check, verify)")
    parser.add_argument("--wheels", type=Path, default=Path("wheels"))
    args = parser.parse_args()
    image = read_list(IMAGE)
    if args.mode == "verify":
        bad = verify(read_list(args.manifest))
        print("\n".join(bad) or "every carried package is installed at its pinned version")
        return 1 if bad else 0
    deps = closure()
    if args.mode == "plan":
        for name, version in needed(deps, image).items():
            where = f"image has {image[name]}" if name in image else "not in the image"
            print(f"{name}=={version}  ({where})")
        return 0
    if args.mode == "make":
        make(deps, image, args.wheels)
        return 0
    errors, notes = problems(deps, image, read_list(args.manifest))
    for note in notes:
        print(f"note: {note} (re-run make to carry it)")
    print("\n".join(errors) or f"image + {args.manifest.name} cover all {len(deps)} packages chainstep needs")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
