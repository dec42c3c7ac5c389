"""`ray job submit --working-dir . -- python jobs/eval.py [CONFIG] [--model ...] [--datasets ...]`: evaluation."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
