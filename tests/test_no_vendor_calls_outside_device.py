"""Only src/stalwart/device.py may name an accelerator vendor's API (DEVELOPERS.md, the rules checked by tests).

Code that calls `torch.cuda` directly works on the developer's GPU and breaks on an NPU,
XPU or CPU host; routing every such call through one module is how the loop stays
portable. This is the lint that keeps it so.
"""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stalwart"
ALLOWED = {PACKAGE / "device.py"}

VENDOR_CALL = re.compile(
    r"torch\.cuda|\.cuda\(|torch_npu|torch\.npu|torch\.xpu|torch\.mps"
    r"|torch\.backends\.(cudnn|cuda|mps)|\.is_cuda"
)


def find_vendor_calls(package: Path, allowed: set[Path]) -> list[str]:
    """Every `file:line: text` under `package` that matches VENDOR_CALL, outside `allowed`."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        if path.resolve() in allowed:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if VENDOR_CALL.search(line):
                hits.append(f"{path.relative_to(package.parent)}:{number}: {line.strip()}")
    return hits


def test_no_accelerator_specific_call_outside_device_module():
    assert PACKAGE.is_dir(), PACKAGE
    hits = find_vendor_calls(PACKAGE, ALLOWED)
    assert not hits, "use stalwart.device instead of vendor APIs:\n" + "\n".join(hits)


def test_checker_catches_a_vendor_call_and_skips_the_allowed_file(tmp_path):
    package = tmp_path / "stalwart"
    (package / "training").mkdir(parents=True)
    (package / "training" / "loop.py").write_text("import torch\n\ntorch.cuda.synchronize()\n")
    (package / "device.py").write_text("torch.cuda.synchronize()\n")
    (package / "clean.py").write_text("x = torch.device('cpu')\n")

    hits = find_vendor_calls(package, {(package / "device.py").resolve()})

    assert hits == ["stalwart/training/loop.py:3: torch.cuda.synchronize()"]
