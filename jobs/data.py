"""`ray job submit --working-dir . -- python jobs/data.py CONFIG [key=value ...]`: the data stage.

The entrypoint runs on the cluster's head (or submitter) with RAY_ADDRESS set by the job
supervisor, so the stage joins that cluster instead of starting its own.
"""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
