"""Where the tests find the project and the real samples (`../shared/data`, absent on some machines:
tests that read it skip with a reason)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The project's root folder."""
SHARED_DATA = ROOT.parent / "shared" / "data"
"""The real samples beside the project (never copied into it: their licences forbid it)."""
