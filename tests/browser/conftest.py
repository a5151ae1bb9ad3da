"""Browser tests: the harness module sits next to the tests (pytest uses importlib mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
