"""python -m kaobs"""
from kaobs.cli import entry

entry()
