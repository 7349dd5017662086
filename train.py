"""Pretrain a GPT: `python train.py [--config=PRESET] [--section.key=value ...]` (see --help).

The same as `gptjax train`: the code is gptjax/train/__main__.py, so that an installed gptjax has it too.
"""

import sys

from gptjax.train.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:], as_script=True)
