"""The engine is plain Python: importing it pulls in no web framework and no Ray."""

from __future__ import annotations

import json
import subprocess
import sys


def test_engine_imports_neither_fastapi_nor_ray():
    code = (
        "import json, sys; import serve.engine; "
        "print(json.dumps({m: m in sys.modules for m in ('fastapi', 'starlette', 'ray')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "fastapi": False,
        "starlette": False,
        "ray": False,
    }
