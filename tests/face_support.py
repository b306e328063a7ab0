"""dlib for the face-scoring tests: skipped locally when it is not installed, a failure under
CI=true (as pg_support does for PostgreSQL), so CI can never pass with the real recognition
scorer silently untested. `make install` installs it (the `face` extra)."""
from __future__ import annotations

import pytest

from pg_support import in_ci


def require_dlib() -> None:
    from avatar_engine.faces.scoring import DLIB_INSTALL_HINT, dlib_available

    if dlib_available():
        return
    reason = f"dlib face scorer not installed ({DLIB_INSTALL_HINT})"
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so the dlib scoring tests must run, not skip", pytrace=False)
    pytest.skip(reason)
