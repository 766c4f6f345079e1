"""``python -m ssamba.data data=<name> [overrides]``: JSON summary of what the config would load."""

from __future__ import annotations

import json
import sys

from ssamba.data.cli import instantiate_data
from ssamba.data.summary import summarize
from ssamba.errors import config_errors_exit_cli


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with config_errors_exit_cli("python -m ssamba.data"):
        summary = summarize(instantiate_data(argv))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
