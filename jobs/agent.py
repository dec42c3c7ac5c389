"""`ray job submit --working-dir . -- python jobs/agent.py [CONFIG] [--model URL] [--tasks FILE]`: agents in batch."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["agent", *sys.argv[1:]]))
