"""`ray job submit --working-dir . -- python jobs/quantize.py MODEL_DIR --method awq-int4 [--calib RUN]`."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
