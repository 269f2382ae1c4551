"""``cryptography`` is loaded only when TLS or certificates are used: it costs every process
that imports it about 10 MiB, and a cluster on plain loopback never needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from amm.base.security.lazy import Lazy

ROOT = Path(__file__).resolve().parents[2]


def _loads_cryptography(code: str) -> bool:
    probe = f"{code}\nimport sys\nprint(any(m.startswith('cryptography') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_the_service_agent_and_client_start_without_cryptography() -> None:
    assert not _loads_cryptography("import amm_service.__main__, worker_agent.__main__, amm")


def test_reading_a_certificate_loads_it() -> None:
    assert _loads_cryptography(
        "from amm.base.security.certs import CertificateAuthority\n"
        "import tempfile, pathlib\n"
        "CertificateAuthority.create(pathlib.Path(tempfile.mkdtemp()))"
    )


def test_a_lazy_name_imports_its_module_at_first_use() -> None:
    lazy = Lazy("json.decoder", "JSONDecodeError")
    assert "json.decoder" in repr(lazy)
    assert lazy.__name__ == "JSONDecodeError"
    assert Lazy("textwrap").dedent("  x") == "x"
