"""`ray job submit --working-dir . -- python jobs/finetune.py CONFIG [key=value ...]`: finetuning."""
import sys

from internray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
