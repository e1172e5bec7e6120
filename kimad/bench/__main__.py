"""``python -m kimad.bench e2e [options]``: the end-to-end comparison (:mod:`kimad.bench.e2e`);
``python -m kimad.bench report DIR``: (re)write its report (:mod:`kimad.bench.report`)."""

import sys

from kimad.bench import e2e, report

COMMANDS = {"e2e": e2e.main, "report": report.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m kimad.bench {{{','.join(COMMANDS)}}} [options]  (--help after the command)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
