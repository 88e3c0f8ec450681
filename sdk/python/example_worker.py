#!/usr/bin/env python3
"""An example orchd worker: counts the words of each job's ``text`` and stores a report.

    orchd token create --db orch.db --tenant acme --scopes orch:work,orch:read > token
    orchd serve --db orch.db --listen 127.0.0.1:8080 &
    python3 example_worker.py --url http://127.0.0.1:8080 --token "$(cat token)" --queue words \\
        --enqueue "the quick brown fox" --until-idle

Payloads: ``{"text": "..."}``; ``{"text": "...", "fail": "permanent"}`` dead-letters the job,
``{"fail": "throttled"}`` reports an upstream 429 with Retry-After 5.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any, List

import orch_worker


def count_words(ctx: orch_worker.JobContext) -> orch_worker.Artifact:
    payload = ctx.payload or {}
    fail = payload.get("fail")
    if fail == "permanent":
        raise orch_worker.Permanent(f"job {ctx.job_id} asked to fail", error_class="asked_to_fail")
    if fail == "throttled":
        raise orch_worker.UpstreamThrottled(5)
    words = str(payload.get("text", "")).split()
    counts: Counter[str] = Counter()
    for i, word in enumerate(words, 1):
        counts[word.lower()] += 1
        ctx.progress({"words": i, "of": len(words)})
        time.sleep(0.05)  # pretend each word is work, so heartbeats and progress have something to do
    report = json.dumps({"words": len(words), "counts": dict(counts.most_common())}, indent=2).encode()
    print(f"job {ctx.job_id} (attempt {ctx.attempt}): {len(words)} words", flush=True)
    return orch_worker.Artifact("report.json", report, "application/json")


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("ORCH_URL", "http://127.0.0.1:8080"), help="orchd base URL")
    p.add_argument("--token", default=os.environ.get("ORCH_TOKEN"), help="API token (default: $ORCH_TOKEN)")
    p.add_argument("--queue", default="words", help="queue to work (default: words)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--enqueue", metavar="TEXT", action="append", default=[], help="enqueue a job with this text first")
    p.add_argument("--until-idle", action="store_true", help="exit once no job is ready and none is running")
    args = p.parse_args(argv)
    if not args.token:
        p.error("--token or $ORCH_TOKEN is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    client = orch_worker.Client(args.url, args.token)
    for text in args.enqueue:
        job: Any = client.enqueue(args.queue, {"text": text}).job
        print(f"enqueued job {job['id']}", flush=True)

    worker = orch_worker.Worker(
        args.url, args.token, queues=[args.queue], handler=count_words, concurrency=args.concurrency
    )
    stats = worker.run(until_idle=args.until_idle)
    print(json.dumps(stats.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
