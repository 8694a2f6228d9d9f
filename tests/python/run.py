"""ctest's entry to the Python tests: `run.py MODULE TEST_FILE` runs pytest on TEST_FILE, or exits 77 (skipped) when MODULE is missing."""
import importlib
import os
import subprocess
import sys

SKIPPED = 77  # SKIP_RETURN_CODE of the ctest entries


def main() -> int:
    module, test_file = sys.argv[1], sys.argv[2]
    for name in ("pytest", module):
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install
            print(f"SKIPPED: {name} is not importable ({e.__class__.__name__}: {e}); "
                  f"install it (scripts/test.sh does with RINGATTN_TEST_PYTHON=1) to run {os.path.basename(test_file)}")
            return SKIPPED
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            os.path.join(here, test_file)] + sys.argv[3:], cwd=here)


if __name__ == "__main__":
    sys.exit(main())
