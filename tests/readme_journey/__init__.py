"""tests/test_readme.py's helpers: the README's commands read from its blocks, the files a newcomer is assumed
to have, and a runner that takes the journey's commands side by side, once per test session."""
