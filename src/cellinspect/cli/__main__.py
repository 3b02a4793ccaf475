"""`python -m cellinspect.cli`: the same as the `cellinspect` command."""

from cellinspect.cli import main

main()
