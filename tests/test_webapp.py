"""The web apps start without pydantic (gateway/webapp.py): about 11 MB of the gateway's resident memory.

In a fresh interpreter, since another test may have imported pydantic into this one. Fails if the pinned
litestar's `_get_default_plugins` changes so that the override no longer takes effect.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = """
import sys
from {module} import {factory}
app = {factory}({args})
names = sorted(type(p).__name__ for p in app.plugins)
assert "pydantic" not in sys.modules, "pydantic was imported"
assert not [n for n in names if "Pydantic" in n or "Attrs" in n], names
print("ok", names)
"""


@pytest.mark.parametrize(
    ("module", "factory", "args"),
    [("webui.app", "create_app", "None"), ("gateway.hq.app", "create_hq_app", "None, 1 << 20")],
)
def test_the_apps_leave_pydantic_unloaded(module: str, factory: str, args: str) -> None:
    code = _CHECK.format(module=module, factory=factory, args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
