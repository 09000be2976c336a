#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a GPU session: puts into .gpu_site/ (git-ignored) what the GPU
# machine lacks and cannot download: the bitsandbytes of requirements-cuda.txt, unpacked and cut to its CUDA 13
# and CPU libraries (the wheel carries 16 builds, 43 MB), and the transformers wheel of requirements.txt.
# Then carry `.gpu_site` and run `bash benchmarks/gpu_session.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.gpu_site
pin() { grep -E "^$1==" "$2" | head -1; }
rm -rf "$DEST" && mkdir -p "$DEST/wheels" "$DEST/bnb"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST/wheels" \
  "$(pin bitsandbytes requirements-cuda.txt)" "$(pin transformers requirements.txt)"
"$PY" - "$DEST" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
dest = Path(sys.argv[1])
wheel = next((dest / "wheels").glob("bitsandbytes-*.whl"))
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.endswith(".so") and not keep.search(name):
            continue
        zf.extract(name, dest / "bnb")
wheel.unlink()
PYEOF
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
du -sh "$DEST"
