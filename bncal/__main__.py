"""``python -m bncal`` (also how torchrun launches it: ``torchrun ... -m bncal recalibrate ...``)."""

from .cli import main

main(prog_name="bncal")
