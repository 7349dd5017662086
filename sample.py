"""Sample continuations from a trained model: `python sample.py --checkpoint=out/run --prompt='def '`.

The same as `gptjax sample`: the code is gptjax/inference/sample.py, so that an installed gptjax has it too.
"""

import sys

from gptjax.inference.sample import main

if __name__ == "__main__":
    main(sys.argv[1:], as_script=True)
