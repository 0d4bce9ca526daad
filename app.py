"""Entry point for `python app.py` and Hugging Face Spaces: all logic lives in mura_demo."""

import sys

from mura_demo.serving.ui import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
