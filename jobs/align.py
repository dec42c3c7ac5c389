"""`ray job submit --working-dir . -- python jobs/align.py CONFIG [key=value ...]`: alignment."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
