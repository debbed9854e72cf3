"""`python -m devstack [--port N]`: the dev stack (what `make dev` runs)."""

import argparse
import sys

from devstack.stack import run_dev

parser = argparse.ArgumentParser(prog="python -m devstack", description="the local dev stack")
parser.add_argument("--port", type=int, default=8080, help="service port (default 8080)")
sys.exit(run_dev(port=parser.parse_args().port))
