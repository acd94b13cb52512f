#!/usr/bin/env python3
"""Generate N synthetic links as TSV (`code<TAB>url`) for tests, benchmarks and comparisons.

Codes are 7-character base62, unique even when compared case-insensitively (nginx's map keys
are case-insensitive, and every server compared must get the same set). URLs are https, 40 to
300 bytes, most near 80 (log-normal), so code + URL average about 90 bytes as in
../shared/ANCHORS.md. The same --seed gives the same file.

usage: data/gen-links.py N OUT.tsv [--seed S]
"""
import argparse
import math
import random
import string
import sys

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
WORDS = ["docs", "blog", "news", "product", "item", "user", "search", "static", "media",
         "article", "2024", "2025", "archive", "en", "de", "view", "page", "catalog"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int)
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.count < 0:
        parser.error("count must be >= 0")
    rng = random.Random(args.seed)
    seen = set()
    with open(args.output, "w", encoding="ascii") as out:
        written = 0
        while written < args.count:
            code = "".join(rng.choice(BASE62) for _ in range(7))
            folded = code.lower()
            if folded in seen:
                continue
            seen.add(folded)
            target_len = min(300, max(40, int(rng.lognormvariate(math.log(75), 0.35))))
            host = "https://www.example-%d.com/" % rng.randint(0, 99999)
            path = []
            while len(host) + len("/".join(path)) < target_len:
                path.append(rng.choice(WORDS))
            url = (host + "/".join(path))[:target_len]
            out.write(code + "\t" + url + "\n")
            written += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
