"""`ray job submit --working-dir . -- python jobs/pretrain.py CONFIG [key=value ...]`: pretraining."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
