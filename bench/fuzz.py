"""Long fuzzing profile: the generators of the CI fuzz tests (tests/fuzz_inputs.py), run longer.

    python -m bench.fuzz --cases 20000                     # 20,000 each: images, text, tensors
    python -m bench.fuzz --only image --seed 7 --start 123 --cases 1   # one image case again

Prints, per input kind, the cases, how many gave a well-formed item (what becomes a 200), how
many a 400/413/415, and every other outcome (a 500 for the client) with what reproduces it.
Exits 1 when there was any.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FUZZERS = ("image", "text", "tensor")


def fuzz(which: str, cases: int, seed: int, start: int = 0):
    """One fuzzer's :class:`Tally` over ``cases`` cases."""
    from tests import fuzz_inputs as inputs

    if which == "image":
        handler = inputs.start_image_handler()
        try:
            return inputs.fuzz_images(handler, seed, cases, start=start)
        finally:
            handler.close()
    if which == "text":
        handler = inputs.start_text_handler()
        try:
            check = lambda tally, case: inputs.check_text_request(tally, handler, case)  # noqa: E731
            return inputs.run_strategy(inputs.text_requests(), check, cases, seed=seed)
        finally:
            handler.close()
    return inputs.run_strategy(inputs.tensor_requests(), inputs.check_tensor_request, cases, seed=seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20_000, help="cases per fuzzer (default 20000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=",".join(FUZZERS), help="comma-separated: image,text,tensor")
    parser.add_argument("--start", type=int, default=0, help="first image case index (to reproduce one)")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(FUZZERS)
    if unknown:
        parser.error(f"--only takes {', '.join(FUZZERS)}; got {', '.join(sorted(unknown))}")

    results, unexpected = {}, 0
    for which in chosen:
        began = time.perf_counter()
        tally = fuzz(which, args.cases, args.seed, args.start)
        seconds = time.perf_counter() - began
        print(f"\n== {which}: {sum(tally.cases.values())} cases, seed {args.seed}, {seconds:.1f} s")
        print(tally.table())
        for line in tally.unexpected[:50]:
            print("UNEXPECTED", line)
        unexpected += len(tally.unexpected)
        results[which] = {
            "seed": args.seed, "seconds": round(seconds, 1),
            "kinds": {kind: {"cases": tally.cases[kind], "ok": tally.ok[kind], "4xx": tally.refused[kind]}
                      for kind in sorted(tally.cases)},
            "statuses": dict(sorted(tally.statuses.items())), "unexpected": tally.unexpected,
        }
    print(f"\nunexpected (non-4xx) errors: {unexpected}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
