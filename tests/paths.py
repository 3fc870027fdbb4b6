"""Where the tests find the project and the real samples (`../shared/data`, absent on some machines:
tests that read it skip with a reason). ``WS3D_SHARED_DATA`` names another folder (e.g. from a git
worktree, whose parent has no ``shared/``)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The project's root folder."""
SHARED_DATA = Path(os.environ.get("WS3D_SHARED_DATA") or ROOT.parent / "shared" / "data")
"""The real samples beside the project (never copied into it: their licences forbid it)."""
