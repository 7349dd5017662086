"""`python -m gptjax COMMAND [options]`: the same as the `gptjax` command (gptjax.commands)."""

from gptjax.commands import run

run()
