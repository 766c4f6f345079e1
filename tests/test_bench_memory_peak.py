"""bench/memory_peak.py's replay of allocator events (the GPU run itself is a benchmark, not a test)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from memory_peak import OWN_CODE, live_at_peak, site  # noqa: E402


def _alloc(addr, size, frames=()):
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size}


def test_live_at_peak_replays_to_the_peak_not_the_end():
    trace = [_alloc(1, 10), _alloc(2, 30), {"action": "free_requested", "addr": 1, "size": 10}, _free(1, 10),
             _alloc(3, 5), _free(2, 30), _alloc(4, 20), _alloc(1, 1)]
    peak, live = live_at_peak(trace)
    assert peak == 40 and sorted(e["addr"] for e in live) == [1, 2]
    assert live_at_peak([]) == (0, [])


def test_site_names_this_projects_frames_first():
    own = f"{OWN_CODE[0]}/ops/pair.py"
    frames = [{"filename": "/lib/torch/functional.py", "line": 3, "name": "linear"},
              {"filename": own, "line": 40, "name": "forward"},
              {"filename": f"{OWN_CODE[0]}/models/ssamba.py", "line": 9, "name": "_pair"}]
    assert site(_alloc(1, 1, frames), 1) == "pair.py:40 forward"
    assert site(_alloc(1, 1, frames), 2) == "pair.py:40 forward <- ssamba.py:9 _pair"
    assert site(_alloc(1, 1, frames[:1]), 1) == "functional.py:3 linear"
    assert site(_alloc(1, 1), 1) == "?"
