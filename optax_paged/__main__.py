"""Command line: ``python -m optax_paged demo`` (also ``optax-paged demo``)."""

from __future__ import annotations

import sys

USAGE = """usage: optax-paged COMMAND [options]

commands:
  demo    train a small character-level transformer once per optimizer and
          compare loss, optimizer-state memory and step time

'optax-paged demo --help' lists the demo's options."""


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "demo":
    from optax_paged import demo
    return demo.main(rest)
  print(f"optax-paged: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
