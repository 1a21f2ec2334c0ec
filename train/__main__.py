"""``python -m train --config configs/<preset>.py [--section.field=value ...]``: train or resume."""

import sys

from train.cli import parse_args
from train.loop import NonFiniteError, train


def main(argv: list[str]) -> int:
  config = parse_args(argv, prog="python -m train")
  try:
    train(config)
  except NonFiniteError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
