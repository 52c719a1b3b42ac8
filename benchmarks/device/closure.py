"""The installed distributions `chatqueue[hf]` needs, transitively, as NAME==VERSION lines (for
Python 3.12 on x86_64 Linux, the device image's), less the names given as arguments.

    .venv/bin/python benchmarks/device/closure.py torch triton numpy
"""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
}


def main() -> None:
    skip = {canonicalize_name(name) for name in sys.argv[1:]}
    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [("chatqueue", ("hf",))]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in skip:
            continue
        dist = metadata.distribution(name)
        seen.setdefault(key, dist.version)
        for raw in dist.requires or []:
            req = Requirement(raw)
            wanted = req.marker is None or any(
                req.marker.evaluate({**MARKERS, "extra": extra}) for extra in (*extras, "")
            )
            if wanted and (canonicalize_name(req.name) not in seen or req.extras):
                todo.append((req.name, tuple(req.extras)))
    seen.pop("chatqueue")
    for key, version in sorted(seen.items()):
        print(f"{key}=={version}")


if __name__ == "__main__":
    main()
