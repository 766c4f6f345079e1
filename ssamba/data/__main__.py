"""``python -m ssamba.data data=<name> [overrides]``: JSON summary of what the config would load."""

from __future__ import annotations

import json
import sys

from ssamba.data.cli import instantiate_data
from ssamba.data.summary import summarize


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    print(json.dumps(summarize(instantiate_data(argv)), indent=2))


if __name__ == "__main__":
    main()
